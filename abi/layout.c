/*
 * layout.c - the layout of every struct of include/moas.h, as this C compiler lays it
 * out: the truth the bindings' own declarations are checked against
 * (tests/python/test_binding.py for ctypes, bindings/rust/moas-sys/tests/layout.rs for
 * Rust; each compiles this file with the system's C compiler). Each struct prints a line
 *
 *   struct NAME SIZEOF ALIGNOF
 *
 * followed by one line per field, in declaration order:
 *
 *   field NAME OFFSET SIZE
 *
 * tests/python/test_api_doc.py checks this list of structs and fields against the
 * header's own, so a field added to moas.h and not here fails there.
 */
#include <moas.h>

#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>

#define STRUCT(T) printf("struct %s %zu %zu\n", #T, sizeof(T), alignof(T))
#define FIELD(T, f) printf("field %s %zu %zu\n", #f, offsetof(T, f), sizeof(((T *)0)->f))

int main(void) {
    STRUCT(moas_allocator);
    FIELD(moas_allocator, alloc);
    FIELD(moas_allocator, free);
    FIELD(moas_allocator, user);

    STRUCT(moas_model_params);
    FIELD(moas_model_params, size);
    FIELD(moas_model_params, use_mmap);
    FIELD(moas_model_params, log);
    FIELD(moas_model_params, log_user);
    FIELD(moas_model_params, allocator);

    STRUCT(moas_tensor_info);
    FIELD(moas_tensor_info, size);
    FIELD(moas_tensor_info, name);
    FIELD(moas_tensor_info, type);
    FIELD(moas_tensor_info, n_dims);
    FIELD(moas_tensor_info, ne);
    FIELD(moas_tensor_info, offset);
    FIELD(moas_tensor_info, n_bytes);
    FIELD(moas_tensor_info, data);

    STRUCT(moas_context_params);
    FIELD(moas_context_params, size);
    FIELD(moas_context_params, n_ctx);
    FIELD(moas_context_params, n_threads);
    FIELD(moas_context_params, mode);
    FIELD(moas_context_params, kv_type);
    FIELD(moas_context_params, kernels);
    FIELD(moas_context_params, log);
    FIELD(moas_context_params, log_user);
    FIELD(moas_context_params, allocator);
    FIELD(moas_context_params, forced_scheme);
    FIELD(moas_context_params, kv_budget_bytes);
    FIELD(moas_context_params, route_fn);
    FIELD(moas_context_params, route_user);
    FIELD(moas_context_params, pool);
    FIELD(moas_context_params, n_batch);

    STRUCT(moas_pool_params);
    FIELD(moas_pool_params, size);
    FIELD(moas_pool_params, capacity_bytes);
    FIELD(moas_pool_params, kv_type);
    FIELD(moas_pool_params, page_heads);
    FIELD(moas_pool_params, n_threads);
    FIELD(moas_pool_params, kernels);
    FIELD(moas_pool_params, n_batch);
    FIELD(moas_pool_params, log);
    FIELD(moas_pool_params, log_user);
    FIELD(moas_pool_params, allocator);
    FIELD(moas_pool_params, steer_below);
    FIELD(moas_pool_params, commit);

    STRUCT(moas_pool_info);
    FIELD(moas_pool_info, size);
    FIELD(moas_pool_info, page_heads);
    FIELD(moas_pool_info, page_bytes);
    FIELD(moas_pool_info, n_pages);
    FIELD(moas_pool_info, pages_free);
    FIELD(moas_pool_info, n_contexts);
    FIELD(moas_pool_info, bytes_capacity);
    FIELD(moas_pool_info, bytes_held);
    FIELD(moas_pool_info, bytes_used);
    FIELD(moas_pool_info, bytes_stored);

    STRUCT(moas_pool_seq);
    FIELD(moas_pool_seq, ctx);
    FIELD(moas_pool_seq, tokens);
    FIELD(moas_pool_seq, n_tokens);
    FIELD(moas_pool_seq, which);
    FIELD(moas_pool_seq, logits);

    STRUCT(moas_tokenize_params);
    FIELD(moas_tokenize_params, size);
    FIELD(moas_tokenize_params, unknown);
    FIELD(moas_tokenize_params, replacement);

    STRUCT(moas_logit_bias);
    FIELD(moas_logit_bias, token);
    FIELD(moas_logit_bias, bias);

    STRUCT(moas_sampler_params);
    FIELD(moas_sampler_params, size);
    FIELD(moas_sampler_params, temperature);
    FIELD(moas_sampler_params, top_k);
    FIELD(moas_sampler_params, top_p);
    FIELD(moas_sampler_params, seed);
    FIELD(moas_sampler_params, allocator);
    FIELD(moas_sampler_params, min_p);
    FIELD(moas_sampler_params, repeat_penalty);
    FIELD(moas_sampler_params, repeat_last_n);
    FIELD(moas_sampler_params, n_logit_bias);
    FIELD(moas_sampler_params, logit_bias);
    FIELD(moas_sampler_params, frequency_penalty);
    FIELD(moas_sampler_params, presence_penalty);
    return 0;
}
