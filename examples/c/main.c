/* Generates from token ids with the bitnet-rs C API, streaming the text.
 *
 *   cc -o generate examples/c/main.c -Icapi/include -Ltarget/release -lbitnet_capi -Wl,-rpath,$PWD/target/release
 *   ./generate MODEL.gguf [MAX_TOKENS] [ID ...]
 *
 * Without ids it starts from stories260K's "Once upon a time" (1 403 407 261 378).
 * Exit status: 0, or the BitnetStatus of the call that failed. */
#include <stdio.h>
#include <stdlib.h>

#include "bitnet.h"

static int print_piece(const char *piece, size_t len, void *user) {
    size_t *count = user;
    *count += 1;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* non-zero would stop the generation */
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [MAX_TOKENS] [ID ...]\n", argv[0]);
        return 1;
    }
    size_t max_tokens = argc > 2 ? (size_t)strtoul(argv[2], NULL, 10) : 20;
    uint32_t prompt[64] = {1, 403, 407, 261, 378};
    size_t n_prompt = 5;
    if (argc > 3) {
        n_prompt = 0;
        for (int i = 3; i < argc && n_prompt < 64; i++) prompt[n_prompt++] = (uint32_t)strtoul(argv[i], NULL, 10);
    }

    BitnetEngineOptions options = bitnet_engine_options_default();
    options.threads = 2;
    BitnetEngine *engine = NULL;
    BitnetStatus status = bitnet_engine_open(argv[1], &options, &engine);
    if (status != BITNET_STATUS_OK) {
        fprintf(stderr, "error %d: %s\n", (int)status, bitnet_last_error());
        return (int)status;
    }

    BitnetSampling sampling = bitnet_sampling_default();
    sampling.temperature = 0; /* greedy */
    BitnetSequence *seq = NULL;
    status = bitnet_sequence_new(engine, &sampling, &seq);
    if (status == BITNET_STATUS_OK) {
        char text[256];
        size_t len = 0;
        if (bitnet_detokenize(engine, prompt, n_prompt, text, sizeof text, &len) == BITNET_STATUS_OK) fputs(text, stdout);
        uint32_t ids[512];
        size_t n_ids = 0, pieces = 0;
        status = bitnet_generate(seq, prompt, n_prompt, max_tokens, print_piece, &pieces, ids, 512, &n_ids);
        printf("\n");
        if (status == BITNET_STATUS_OK) {
            fprintf(stderr, "bitnet %s: %zu ids in %zu pieces:", bitnet_version(), n_ids, pieces);
            for (size_t i = 0; i < n_ids; i++) fprintf(stderr, " %u", ids[i]);
            fprintf(stderr, "\n");
        }
    }
    if (status != BITNET_STATUS_OK) fprintf(stderr, "error %d: %s\n", (int)status, bitnet_last_error());
    bitnet_sequence_free(seq);
    bitnet_engine_close(engine);
    return (int)status;
}
