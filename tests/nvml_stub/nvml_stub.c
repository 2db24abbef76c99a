/*
 * A stand-in for libnvidia-ml.so.1, so swapd's GPU code runs through the real
 * nvidia-ml-py bindings on machines without an NVIDIA GPU.
 *
 * It implements the NVML entry points that nvidia-ml-py calls for what swapd
 * reads, with the same names (including the _v2/_v3 variants) and the same
 * struct layouts as nvml.h. What it reports comes from a state directory named
 * by $SWAPD_STUB_NVML_STATE, read afresh on every call:
 *
 *   <pid>            a process holding the MiB written in the file on GPU 0
 *                    (the fake backend's --vram-mib writes these). It is
 *                    reported only while /proc/<pid> is alive and not a zombie.
 *   <pid>@<n>        the same on GPU n;  g<pid>[@<n>]  a graphics process.
 *
 * Knobs, each a file in the same directory (all optional):
 *   devices          number of GPUs (default 1, at most 8)
 *   total_mib        memory per GPU (default 24576)
 *   base_mib         memory used with no process (default 400)
 *   reserved_mib     driver-reserved memory, memory info v2 only (default 256)
 *   leak_mib         extra used memory that no process holds and that never returns
 *   leak_dead        present: a registered process that died keeps its memory
 *                    used (listed by no process) - memory that never returns
 *   stuck            present: a registered process that died is still listed
 *                    with its memory - a pid that cannot be killed
 *   hide_pids        present: report every pid plus an offset (the file's number,
 *                    default 1000000000), as NVML does from another PID namespace
 *   persistence      0 or 1 (default 1)
 *   power            "<draw W> <limit W>" (default "30 300")
 *   sensors          "<temp C> <gpu util %> <memory util %>" (default "41 0 0")
 *   throttle         clock event reason bit mask, e.g. 0x80 (default 0x1, idle)
 *   driver           driver version string (default 550.54.15)
 *   legacy           present: the versioned calls (memory info v2, running
 *                    processes v3, clock event reasons) are missing, as on old drivers
 *   fail_init        present: nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED
 *   calls            present: every call appends its name to this file
 */

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_FUNCTION_NOT_FOUND 13
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25

#define MIB (1024ULL * 1024ULL)
#define MAX_DEVICES 8
#define MAX_PROCS 256

typedef struct {
    unsigned int index;
} stubDevice_t;
typedef stubDevice_t *nvmlDevice_t;

/* nvml.h: nvmlMemory_t */
typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

/* nvml.h: nvmlMemory_v2_t; its version is nvmlMemory_v2 */
typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;
#define NVML_STRUCT_VERSION(size, ver) ((unsigned int)(size) | ((unsigned int)(ver) << 24U))
#define nvmlMemory_v2 NVML_STRUCT_VERSION(sizeof(nvmlMemory_v2_t), 2)

/* nvml.h: nvmlProcessInfo_v2_t, which is also the layout of the _v3 calls */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

static stubDevice_t g_devices[MAX_DEVICES];
static int g_init_count = 0;

/* ------------------------------------------------------------------ state */

static const char *state_dir(void) {
    const char *dir = getenv("SWAPD_STUB_NVML_STATE");
    return (dir && *dir) ? dir : NULL;
}

/* Read a knob file into buf; returns 1 when it exists. */
static int read_knob(const char *name, char *buf, size_t size) {
    const char *dir = state_dir();
    char path[4096];
    FILE *f;
    size_t n;
    if (!dir)
        return 0;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "r");
    if (!f)
        return 0;
    n = fread(buf, 1, size - 1, f);
    buf[n] = '\0';
    fclose(f);
    return 1;
}

static int has_knob(const char *name) {
    char buf[8];
    return read_knob(name, buf, sizeof buf);
}

static unsigned long long knob_ull(const char *name, unsigned long long fallback) {
    char buf[128];
    char *end;
    unsigned long long value;
    if (!read_knob(name, buf, sizeof buf))
        return fallback;
    errno = 0;
    value = strtoull(buf, &end, 0);
    if (errno || end == buf)
        return fallback;
    return value;
}

static void trace(const char *fn) {
    const char *dir = state_dir();
    char path[4096];
    FILE *f;
    if (!dir)
        return;
    snprintf(path, sizeof path, "%s/calls", dir);
    if (access(path, F_OK) != 0)
        return;
    f = fopen(path, "a");
    if (f) {
        fprintf(f, "%s\n", fn);
        fclose(f);
    }
}

/* 1 while the process exists and is neither a zombie nor dead. */
static int process_alive(unsigned int pid) {
    char path[64], buf[512];
    FILE *f;
    size_t n;
    char *close_paren;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    f = fopen(path, "r");
    if (!f)
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    close_paren = strrchr(buf, ')');
    if (!close_paren || close_paren[1] != ' ')
        return 0;
    return close_paren[2] != 'Z' && close_paren[2] != 'X';
}

typedef struct {
    unsigned int pid;
    unsigned long long mib;
    int graphics;
    int alive;
} stubProc_t;

/* Registered processes on ``device``; returns how many were found. */
static int registered(unsigned int device, stubProc_t *out, int max) {
    const char *dir = state_dir();
    DIR *d;
    struct dirent *entry;
    int count = 0;
    if (!dir)
        return 0;
    d = opendir(dir);
    if (!d)
        return 0;
    while ((entry = readdir(d)) != NULL && count < max) {
        const char *p = entry->d_name;
        int graphics = 0;
        unsigned long pid = 0, dev = 0;
        char *end;
        char buf[64];
        char path[4096];
        FILE *f;
        size_t n;
        if (*p == 'g') {
            graphics = 1;
            p++;
        }
        if (!isdigit((unsigned char)*p))
            continue;
        pid = strtoul(p, &end, 10);
        if (*end == '@') {
            const char *q = end + 1;
            if (!isdigit((unsigned char)*q))
                continue;
            dev = strtoul(q, &end, 10);
        }
        if (*end != '\0' || pid == 0 || dev != device)
            continue; /* e.g. "<pid>.tmp" while the fake backend writes its file */
        snprintf(path, sizeof path, "%s/%s", dir, entry->d_name);
        f = fopen(path, "r");
        if (!f)
            continue;
        n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        out[count].pid = (unsigned int)pid;
        out[count].mib = strtoull(buf, NULL, 10);
        out[count].graphics = graphics;
        out[count].alive = process_alive((unsigned int)pid);
        count++;
    }
    closedir(d);
    return count;
}

static unsigned long long used_mib(unsigned int device) {
    stubProc_t procs[MAX_PROCS];
    int n = registered(device, procs, MAX_PROCS);
    int keep_dead = has_knob("leak_dead") || has_knob("stuck");
    unsigned long long used = knob_ull("base_mib", 400) + knob_ull("leak_mib", 0);
    int i;
    for (i = 0; i < n; i++) {
        int j, counted = 0;
        if (!(procs[i].alive || keep_dead))
            continue;
        /* a process in both lists (compute and graphics) holds its memory once */
        for (j = 0; j < n; j++)
            if (j != i && procs[j].pid == procs[i].pid &&
                (procs[j].mib > procs[i].mib || (procs[j].mib == procs[i].mib && j < i)))
                counted = 1;
        if (!counted)
            used += procs[i].mib;
    }
    return used;
}

static unsigned int device_count(void) {
    unsigned long long n = knob_ull("devices", 1);
    if (n > MAX_DEVICES)
        n = MAX_DEVICES;
    return (unsigned int)n;
}

static nvmlReturn_t check_device(nvmlDevice_t device) {
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (device < &g_devices[0] || device >= &g_devices[MAX_DEVICES] || device->index >= device_count())
        return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

static int copy_string(char *dst, unsigned int length, const char *src) {
    if (!dst || length == 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------ init, system */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    unsigned int i;
    (void)flags;
    trace("nvmlInitWithFlags");
    if (has_knob("fail_init"))
        return NVML_ERROR_DRIVER_NOT_LOADED;
    for (i = 0; i < MAX_DEVICES; i++)
        g_devices[i].index = i;
    g_init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    trace("nvmlShutdown");
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    g_init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    char buf[80] = "550.54.15";
    trace("nvmlSystemGetDriverVersion");
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (read_knob("driver", buf, sizeof buf))
        buf[strcspn(buf, "\r\n")] = '\0';
    return copy_string(version, length, buf);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    trace("nvmlSystemGetNVMLVersion");
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return copy_string(version, length, "12.550.54.15");
}

/* ------------------------------------------------------------------ devices */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    trace("nvmlDeviceGetCount_v2");
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = device_count();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    trace("nvmlDeviceGetHandleByIndex_v2");
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= device_count())
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetIndex");
    if (ret != NVML_SUCCESS)
        return ret;
    *index = device->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    char buf[96];
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetName");
    if (ret != NVML_SUCCESS)
        return ret;
    snprintf(buf, sizeof buf, "Stub GPU %u", device->index);
    return copy_string(name, length, buf);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    char buf[96];
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetUUID");
    if (ret != NVML_SUCCESS)
        return ret;
    snprintf(buf, sizeof buf, "GPU-5705d000-0000-4000-8000-%012u", device->index);
    return copy_string(uuid, length, buf);
}

/* ------------------------------------------------------------------- memory */

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    unsigned long long total, used;
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetMemoryInfo");
    if (ret != NVML_SUCCESS)
        return ret;
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    total = knob_ull("total_mib", 24576);
    /* v1 counts the driver's reservation as used */
    used = used_mib(device->index) + knob_ull("reserved_mib", 256);
    if (used > total)
        used = total;
    memory->total = total * MIB;
    memory->used = used * MIB;
    memory->free = (total - used) * MIB;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    unsigned long long total, used, reserved;
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetMemoryInfo_v2");
    if (ret != NVML_SUCCESS)
        return ret;
    if (has_knob("legacy"))
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    total = knob_ull("total_mib", 24576);
    reserved = knob_ull("reserved_mib", 256);
    used = used_mib(device->index);
    if (reserved > total)
        reserved = total;
    if (used > total - reserved)
        used = total - reserved;
    memory->total = total * MIB;
    memory->reserved = reserved * MIB;
    memory->used = used * MIB;
    memory->free = (total - reserved - used) * MIB;
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------- processes */

static nvmlReturn_t running_processes(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos, int graphics) {
    stubProc_t procs[MAX_PROCS];
    int n, i;
    unsigned int listed = 0, capacity;
    int stuck = has_knob("stuck");
    unsigned long long offset = 0;
    char buf[64];
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (read_knob("hide_pids", buf, sizeof buf)) {
        offset = strtoull(buf, NULL, 0);
        if (offset == 0)
            offset = 1000000000ULL;
    }
    capacity = infos ? *count : 0;
    n = registered(device->index, procs, MAX_PROCS);
    for (i = 0; i < n; i++) {
        if (procs[i].graphics != graphics || !(procs[i].alive || stuck))
            continue;
        if (listed < capacity) {
            infos[listed].pid = (unsigned int)(procs[i].pid + offset);
            infos[listed].usedGpuMemory = procs[i].mib * MIB;
            infos[listed].gpuInstanceId = 0xFFFFFFFFu;
            infos[listed].computeInstanceId = 0xFFFFFFFFu;
        }
        listed++;
    }
    *count = listed;
    return listed > capacity ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos) {
    trace("nvmlDeviceGetComputeRunningProcesses_v3");
    if (has_knob("legacy"))
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    return running_processes(device, count, infos, 0);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos) {
    trace("nvmlDeviceGetComputeRunningProcesses_v2");
    return running_processes(device, count, infos, 0);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos) {
    trace("nvmlDeviceGetGraphicsRunningProcesses_v3");
    if (has_knob("legacy"))
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    return running_processes(device, count, infos, 1);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos) {
    trace("nvmlDeviceGetGraphicsRunningProcesses_v2");
    return running_processes(device, count, infos, 1);
}

/* ------------------------------------------------------- power and clocks */

nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, unsigned int *mode) {
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetPersistenceMode");
    if (ret != NVML_SUCCESS)
        return ret;
    *mode = knob_ull("persistence", 1) ? 1 : 0;
    return NVML_SUCCESS;
}

static void power_knob(unsigned int *draw_w, unsigned int *limit_w) {
    char buf[64];
    *draw_w = 30;
    *limit_w = 300;
    if (read_knob("power", buf, sizeof buf))
        sscanf(buf, "%u %u", draw_w, limit_w);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *milliwatts) {
    unsigned int draw, limit;
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetPowerUsage");
    if (ret != NVML_SUCCESS)
        return ret;
    power_knob(&draw, &limit);
    *milliwatts = draw * 1000;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *milliwatts) {
    unsigned int draw, limit;
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetEnforcedPowerLimit");
    if (ret != NVML_SUCCESS)
        return ret;
    power_knob(&draw, &limit);
    *milliwatts = limit * 1000;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *milliwatts) {
    trace("nvmlDeviceGetPowerManagementLimit");
    return nvmlDeviceGetEnforcedPowerLimit(device, milliwatts);
}

/* temperature and utilization: knob "sensors" = "<temp C> <gpu util %> <memory util %>" (default "41 0 0") */
static void sensors_knob(unsigned int *temp_c, unsigned int *gpu_pct, unsigned int *mem_pct) {
    char buf[64];
    *temp_c = 41;
    *gpu_pct = 0;
    *mem_pct = 0;
    if (read_knob("sensors", buf, sizeof buf))
        sscanf(buf, "%u %u %u", temp_c, gpu_pct, mem_pct);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    unsigned int t, g, m;
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetTemperature");
    if (ret != NVML_SUCCESS)
        return ret;
    if (sensor != 0)
        return NVML_ERROR_NOT_SUPPORTED;
    sensors_knob(&t, &g, &m);
    *temp = t;
    return NVML_SUCCESS;
}

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    unsigned int t, g, m;
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetUtilizationRates");
    if (ret != NVML_SUCCESS)
        return ret;
    sensors_knob(&t, &g, &m);
    util->gpu = g;
    util->memory = m;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetCurrentClocksEventReasons");
    if (ret != NVML_SUCCESS)
        return ret;
    if (has_knob("legacy"))
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    *reasons = knob_ull("throttle", 0x1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *reasons) {
    nvmlReturn_t ret = check_device(device);
    trace("nvmlDeviceGetCurrentClocksThrottleReasons");
    if (ret != NVML_SUCCESS)
        return ret;
    *reasons = knob_ull("throttle", 0x1);
    return NVML_SUCCESS;
}
