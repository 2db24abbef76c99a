// Drives swapd's Ollama API with the official `ollama` JavaScript library (npm), as a Node app would.
// Usage: node ollama_client.mjs HOST MODEL   (prints one JSON line with what it saw)
import { Ollama } from "ollama";

const [host, model] = process.argv.slice(2);
const client = new Ollama({ host });
const out = {};
out.list = (await client.list()).models.map((m) => m.name);
const whole = await client.chat({ model, messages: [{ role: "user", content: "hi" }] });
out.whole = { content: whole.message.content, done: whole.done, eval_count: whole.eval_count };
const pieces = [];
for await (const part of await client.chat({ model, messages: [{ role: "user", content: "hi" }], stream: true })) {
  pieces.push({ content: part.message.content, done: part.done, eval_count: part.eval_count ?? null });
}
out.pieces = pieces;
const gen = await client.generate({ model, prompt: "go", stream: false });
out.generate = gen.response;
out.ps = (await client.ps()).models.map((m) => m.name);
try {
  await client.chat({ model: "no-such-model", messages: [{ role: "user", content: "hi" }] });
  out.error = null;
} catch (err) {
  out.error = { status: err.status_code, message: err.error };
}
console.log(JSON.stringify(out));
