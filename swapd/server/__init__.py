"""HTTP side of swapd: the aiohttp app, relay and error rendering."""
