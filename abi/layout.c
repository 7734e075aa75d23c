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
 *   field NAME OFFSET SIZE KIND
 *
 * KIND is f (floating point), i (integer or enum) or p (pointer, function pointer
 * included); an array's is its elements'. A float declared where the header has an
 * int32_t (or a pointer where it has a uint64_t) has the same offset and size: only the
 * kind tells them apart, and the value would be read as the other type's bits.
 *
 * tests/python/test_api_doc.py checks this list of structs and fields against the
 * header's own, so a field added to moas.h and not here fails there.
 */
#include <moas.h>

#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>

#define STRUCT(T) printf("struct %s %zu %zu\n", #T, sizeof(T), alignof(T))
/* not evaluated: _Generic and sizeof only look at the type */
#define KIND(x)                                                                          \
    _Generic((x), float: "f", double: "f", char: "i", signed char: "i",                 \
             unsigned char: "i", short: "i", unsigned short: "i", int: "i",              \
             unsigned: "i", long: "i", unsigned long: "i", long long: "i",               \
             unsigned long long: "i", _Bool: "i", default: "p")
#define FIELD_KIND(T, f, kind)                                                           \
    printf("field %s %zu %zu %s\n", #f, offsetof(T, f), sizeof(((T *)0)->f), kind)
#define FIELD(T, f) FIELD_KIND(T, f, KIND(((T *)0)->f))
/* an array would decay to a pointer: its first element's kind */
#define ARRAY_FIELD(T, f) FIELD_KIND(T, f, KIND(((T *)0)->f[0]))

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
    ARRAY_FIELD(moas_tensor_info, ne);
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
    FIELD(moas_pool_info, n_threads);

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
