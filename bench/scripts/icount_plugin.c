/*
 * A QEMU TCG plugin that counts guest instructions between two markers the guest sets itself,
 * for bench/scripts/arm64_icount.sh: the deterministic cost of one inference on an emulated
 * Cortex-A72 / A76, which a Pi's clock cannot give on this machine.
 *
 * The guest marks a phase with lseek(-1, MAGIC + k, SEEK_SET) (an EBADF no-op that any runtime can
 * issue: Python's os.lseek): k = 1 starts counting, k = 2 stops and writes the count of the phase
 * to the file named by the plugin argument out=PATH, one line per phase.  Counting is inline (one
 * add per executed translation block), so every instruction of every block is counted.
 *
 * QEMU 7.2's plugin API (version 1) is declared here rather than included: Debian ships no
 * qemu-plugin.h.  Build: gcc -shared -fPIC -O2 -o libicount.so icount_plugin.c
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num,
                                              uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                                              uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define LSEEK_AARCH64 62
#define MAGIC 0x1C0C0DE000ULL

static uint64_t insns;  /* all guest threads add here: run the guest single-threaded */
static uint64_t start;
static FILE *out;

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != LSEEK_AARCH64 || (int64_t)a1 != -1) {
        return;
    }
    if (a2 == MAGIC + 1) {
        start = insns;
    } else if (a2 == MAGIC + 2 && out) {
        fprintf(out, "%" PRIu64 "\n", insns - start);
        fflush(out);
    }
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    if (out) {
        fclose(out);
    }
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = fopen(argv[i] + 4, "w");
        }
    }
    if (!out) {
        fprintf(stderr, "icount plugin: give out=PATH\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
