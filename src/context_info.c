/*
 * context_info.c - read-only facts a context's creation fixed: the KV bytes one token
 * occupies, the threads a call uses.
 *
 * Owns nothing: it reads struct moas_context (context.h) and asks context.c's own
 * accounting (moas__kv_token_bytes), so that what these functions report is what the
 * cache does, never a second formula. Kept apart from context.c, which owns the
 * context's lifecycle and decoding.
 */
#include "context.h"

uint64_t moas_context_kv_token_bytes(const moas_context *ctx, int32_t scheme) {
    if (ctx == NULL || scheme < -1 || scheme >= ctx->model->n_scheme) {
        return 0;
    }
    return moas__kv_token_bytes(ctx, scheme) * (uint64_t)ctx->model->n_layer;
}

int32_t moas_context_n_threads(const moas_context *ctx) {
    if (ctx == NULL) {
        return 0;
    }
    return ctx->n_threads;
}
