/*
 * moas.hpp - a small RAII wrapper over <moas.h> for C++17 (header-only, example code).
 *
 * Each C object lives in a std::unique_ptr whose deleter is its _free function, so
 * objects are released on every path, exceptions included. A failing call throws
 * moas::error, which carries the status, its name and moas_last_error(). Lifetimes are
 * the C API's: a model must outlive its contexts, and context::logits() is borrowed
 * until the next decode, truncate or reset of that context.
 */
#ifndef MOAS_HPP
#define MOAS_HPP

#include <moas.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moas {

/* "MOAS_ERR_IO" for MOAS_ERR_IO: the header's status table, expanded once more. */
inline const char *status_name(moas_status status) noexcept {
    switch (status) {
#define MOAS_HPP_NAME_(name_, value_, msg_) \
    case MOAS_##name_:                      \
        return "MOAS_" #name_;
        MOAS_STATUS_MAP(MOAS_HPP_NAME_)
#undef MOAS_HPP_NAME_
    default:
        return "MOAS_STATUS_UNKNOWN";
    }
}

class error : public std::runtime_error {
public:
    error(moas_status status, const std::string &message)
        : std::runtime_error(std::string(status_name(status)) + " (" +
                             moas_status_string(status) + "): " + message),
          status_(status), message_(message) {}
    moas_status status() const noexcept { return status_; }
    const std::string &message() const noexcept { return message_; }  // moas_last_error()

private:
    moas_status status_;
    std::string message_;
};

/* Throw moas::error for a failed status. */
inline void check(moas_status status) {
    if (status != MOAS_OK) {
        throw error(status, moas_last_error());
    }
}

struct free_model { void operator()(moas_model *p) const noexcept { moas_model_free(p); } };
struct free_context { void operator()(moas_context *p) const noexcept { moas_context_free(p); } };
struct free_sampler { void operator()(moas_sampler *p) const noexcept { moas_sampler_free(p); } };
struct free_pool { void operator()(moas_pool *p) const noexcept { moas_pool_free(p); } };

class model {
public:
    explicit model(const std::string &path, const moas_model_params *params = nullptr) {
        moas_model *p = nullptr;
        check(moas_model_load(path.c_str(), params, &p));
        ptr_.reset(p);
    }
    const moas_model *get() const noexcept { return ptr_.get(); }

    int32_t n_vocab() const noexcept { return moas_model_n_vocab(get()); }
    int32_t n_layer() const noexcept { return moas_model_n_layer(get()); }
    int32_t n_scheme() const noexcept { return moas_model_n_scheme(get()); }
    std::string_view name() const noexcept { return moas_model_name(get()); }

    std::vector<int32_t> tokenize(std::string_view text) const {
        std::vector<int32_t> ids(text.size());  // one id per character, so per byte at most
        size_t n = 0;
        if (!text.empty()) {
            check(moas_tokenize(get(), text.data(), text.size(), ids.data(), ids.size(), &n));
        }
        ids.resize(n);
        return ids;
    }

    std::string detokenize(const std::vector<int32_t> &ids) const {
        std::string text(4 * ids.size() + 1, '\0');  // a character is at most 4 bytes
        size_t length = 0;
        check(moas_detokenize(get(), ids.data(), ids.size(), text.data(), text.size(), &length));
        text.resize(length);
        return text;
    }

    std::string_view token_text(int32_t token) const {
        const char *text = moas_token_text(get(), token);
        if (text == nullptr) {
            throw error(MOAS_ERR_INVALID_ARG, "token " + std::to_string(token) + " out of range");
        }
        return text;
    }

private:
    std::unique_ptr<moas_model, free_model> ptr_;
};

/* A KV pool many contexts take pages from; it must outlive them. */
class pool {
public:
    pool(const model &m, const moas_pool_params &params) {
        moas_pool *p = nullptr;
        check(moas_pool_create(m.get(), &params, &p));
        ptr_.reset(p);
    }
    moas_pool *get() const noexcept { return ptr_.get(); }

    /* Advance many contexts of the pool in one call; each as if decoded alone. */
    void decode(const std::vector<moas_pool_seq> &seqs) {
        check(moas_pool_decode(get(), seqs.data(), static_cast<int32_t>(seqs.size())));
    }
    moas_pool_info stats() const {
        moas_pool_info info{};
        info.size = sizeof info;
        check(moas_pool_stats(get(), &info));
        return info;
    }

private:
    std::unique_ptr<moas_pool, free_pool> ptr_;
};

class context {
public:
    explicit context(const model &m, const moas_context_params *params = nullptr) {
        moas_context *p = nullptr;
        check(moas_context_create(m.get(), params, &p));
        ptr_.reset(p);
    }
    /* A context in `pl` with otherwise default parameters (mode as given). */
    context(const model &m, pool &pl, moas_mode mode = MOAS_MODE_MIXTURE) {
        moas_context_params params;
        moas_context_params_init(&params);
        params.pool = pl.get();
        params.mode = mode;
        moas_context *p = nullptr;
        check(moas_context_create(m.get(), &params, &p));
        ptr_.reset(p);
    }

    /* A new context continuing from this one's tokens, sharing its pages (in a pool). */
    context fork() {
        moas_context *p = nullptr;
        check(moas_context_fork(get(), &p));
        return context(p);
    }
    std::vector<unsigned char> save_state() const {
        std::vector<unsigned char> buf(moas_context_state_size(get()));
        size_t written = 0;
        check(moas_context_state_save(get(), buf.data(), buf.size(), &written));
        buf.resize(written);
        return buf;
    }
    void load_state(const std::vector<unsigned char> &buf) {
        check(moas_context_state_load(get(), buf.data(), buf.size()));
    }
    int32_t kv_pages() const noexcept { return moas_context_kv_pages(get()); }
    size_t kv_bytes_held() const noexcept { return moas_context_kv_bytes_held(get()); }

    /* Routed mode, pooled K/V: the tokens before n_before pooled down to `scheme` in
     * place, pages freed; returns the token-layer pairs that changed. */
    int32_t compact(int32_t n_before, int32_t scheme) {
        int32_t changed = 0;
        check(moas_context_compact(get(), n_before, scheme, &changed));
        return changed;
    }
    /* RoPE models: drop positions [n_keep, n_keep + n_discard), move the later ones down. */
    void shift(int32_t n_keep, int32_t n_discard) {
        check(moas_context_shift(get(), n_keep, n_discard));
    }
    moas_context *get() const noexcept { return ptr_.get(); }

    void decode(int32_t token) { check(moas_context_decode(get(), token, nullptr)); }
    void decode(const std::vector<int32_t> &tokens) {
        check(moas_context_decode_batch(get(), tokens.data(), static_cast<int32_t>(tokens.size()),
                                        nullptr, MOAS_LOGITS_LAST));
    }
    /* n_vocab floats, borrowed until the next decode, truncate or reset; or nullptr. */
    const float *logits() const noexcept { return moas_context_logits(get()); }

    int32_t n_past() const noexcept { return moas_context_n_past(get()); }
    int32_t n_ctx() const noexcept { return moas_context_n_ctx(get()); }
    void truncate(int32_t n_keep) { check(moas_context_truncate(get(), n_keep)); }
    void reset() noexcept { moas_context_reset(get()); }

    std::vector<int32_t> scheme_counts(int32_t layer = -1) const {
        std::vector<int32_t> counts(
            static_cast<size_t>(moas_model_n_scheme(moas_context_model(get()))));
        check(moas_context_scheme_counts(get(), layer, counts.data()));
        return counts;
    }
    size_t kv_bytes_used(int32_t layer = -1) const noexcept {
        return moas_context_kv_bytes_used(get(), layer);
    }
    /* Bytes of one token over all layers: -1 mixture mode's, s routed to scheme s. */
    uint64_t kv_token_bytes(int32_t scheme) const noexcept {
        return moas_context_kv_token_bytes(get(), scheme);
    }

private:
    explicit context(moas_context *p) noexcept { ptr_.reset(p); }
    std::unique_ptr<moas_context, free_context> ptr_;
};

class sampler {
public:
    explicit sampler(int32_t n_vocab, const moas_sampler_params *params = nullptr) {
        moas_sampler *p = nullptr;
        check(moas_sampler_create(params, n_vocab, &p));
        ptr_.reset(p);
    }
    int32_t sample(const float *logits) {
        int32_t token = 0;
        check(moas_sampler_sample(ptr_.get(), logits, &token));
        return token;
    }

private:
    std::unique_ptr<moas_sampler, free_sampler> ptr_;
};

}  // namespace moas

#endif  // MOAS_HPP
