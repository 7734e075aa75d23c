/*
 * moas.hpp - a small RAII wrapper over <moas.h> for C++17 (header-only, example code).
 *
 * Each C object is released by its _free function on every path, exceptions included.
 * A failing call throws moas::error, which carries the status, its name and
 * moas_last_error(). Lifetimes are kept for you: a model is shared by the pools and
 * contexts made from it, and a context keeps its model or pool alive, so none of them
 * can be freed under another (the C API asks the caller to order the frees). A
 * context's logits() are borrowed until the next call that changes the context
 * (decode, a pool decode, truncate, reset, load_state) or its end.
 *
 * Threads: const members may run concurrently with other const members of the same
 * object; anything else needs the object to itself, as in the standard library (the C
 * API allows a little more: see moas.h). A moved-from object may only be assigned to
 * or destroyed; its accessors return 0 or nullptr and its other calls throw.
 */
#ifndef MOAS_HPP
#define MOAS_HPP

#include <moas.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moas {

/* "MOAS_ERR_IO" for MOAS_ERR_IO, "MOAS_UNKNOWN" outside the table: the linked library's
 * names, so a status added after this header was compiled is named too. */
inline const char *status_name(moas_status status) noexcept { return moas_status_name(status); }

/* Copies without throwing, as an exception should: the message is shared. */
class error : public std::runtime_error {
public:
    error(moas_status status, const std::string &message)
        : std::runtime_error(std::string(status_name(status)) + " (" +
                             moas_status_string(status) + "): " + message),
          status_(status), message_(std::make_shared<const std::string>(message)) {}
    moas_status status() const noexcept { return status_; }
    const std::string &message() const noexcept {   // moas_last_error()
        static const std::string none;
        return message_ ? *message_ : none;          // (a moved-from error has none)
    }
    /* MOAS_ERR_POOL_FULL: how many pages the pool lacked, which the library gives in its
     * message alone ("... the KV pool lacks 12 page(s): 16 needed, 4 free of 64");
     * nullopt for another status, or a message without the count. */
    std::optional<uint64_t> pages_lacking() const noexcept {
        const std::string &m = message();
        const size_t at = m.find("lacks ");
        if (status_ != MOAS_ERR_POOL_FULL || at == std::string::npos) {
            return std::nullopt;
        }
        uint64_t n = 0;
        size_t i = at + 6;
        for (; i < m.size() && m[i] >= '0' && m[i] <= '9'; i++) {
            n = n * 10 + static_cast<uint64_t>(m[i] - '0');
        }
        return i > at + 6 ? std::optional<uint64_t>(n) : std::nullopt;
    }

private:
    moas_status status_;
    std::shared_ptr<const std::string> message_;
};

/* Throw moas::error for a failed status. */
inline void check(moas_status status) {
    if (status != MOAS_OK) {
        throw error(status, moas_last_error());
    }
}

namespace detail {

/* check() with the message read when the call returned: a decoding call's clean-up
 * (route hooks replaced during it, whose destructors may call the library) comes
 * between, and could overwrite moas_last_error(). */
inline void check(moas_status status, const std::string &message) {
    if (status != MOAS_OK) {
        throw error(status, message);
    }
}

/* A size as the C API's int32_t count, or moas::error: never wrapped. */
inline int32_t count(size_t n, const char *what) {
    if (n > static_cast<size_t>(INT32_MAX)) {
        throw error(MOAS_ERR_INVALID_ARG, std::string(what) + ": " + std::to_string(n) +
                                              " is more than an int32_t holds");
    }
    return static_cast<int32_t>(n);
}

/* The handle of a moved-from object is null: calls that would pass it on throw. */
template <typename T> T *live(T *p) {
    if (p == nullptr) {
        throw error(MOAS_ERR_INVALID_ARG, "a moved-from object was used");
    }
    return p;
}

}  // namespace detail

struct free_context { void operator()(moas_context *p) const noexcept { moas_context_free(p); } };
struct free_sampler { void operator()(moas_sampler *p) const noexcept { moas_sampler_free(p); } };

class pool;
class context;

/* A loaded model. Copies share it (it is read-only: any threads may use it). */
class model {
public:
    explicit model(const std::string &path, const moas_model_params *params = nullptr) {
        moas_model *p = nullptr;
        check(moas_model_load(path.c_str(), params, &p));
        ptr_.reset(p, [](moas_model *q) noexcept { moas_model_free(q); });
    }
    const moas_model *get() const noexcept { return ptr_.get(); }

    int32_t n_vocab() const noexcept { return get() ? moas_model_n_vocab(get()) : 0; }
    int32_t n_layer() const noexcept { return get() ? moas_model_n_layer(get()) : 0; }
    int32_t n_scheme() const noexcept { return get() ? moas_model_n_scheme(get()) : 0; }
    int32_t n_ctx_train() const noexcept { return get() ? moas_model_n_ctx_train(get()) : 0; }
    moas_kv_sharing kv_sharing() const noexcept {
        return get() ? moas_model_kv_sharing(get()) : MOAS_KV_SHARING_INDEPENDENT;
    }
    std::string_view name() const noexcept { return get() ? moas_model_name(get()) : ""; }

    std::vector<int32_t> tokenize(std::string_view text) const {
        std::vector<int32_t> ids(text.size());  // one id per character, so per byte at most
        size_t n = 0;
        if (!text.empty()) {
            check(moas_tokenize(detail::live(get()), text.data(), text.size(), ids.data(),
                                ids.size(), &n));
        }
        ids.resize(n);
        return ids;
    }

    /* What tokenize_lenient() gives: the ids, and how many characters outside the
     * vocabulary were replaced or dropped. */
    struct lenient_tokens {
        std::vector<int32_t> ids;
        size_t changed = 0;
    };
    /* Token ids of `text` with each character outside the vocabulary replaced by the
     * token `replacement`, or dropped when it is nullopt (moas_tokenize_ex). Invalid
     * UTF-8 still throws (MOAS_ERR_INVALID_UTF8). */
    lenient_tokens tokenize_lenient(std::string_view text,
                                    std::optional<int32_t> replacement) const {
        moas_tokenize_params params;
        moas_tokenize_params_init(&params);
        params.unknown = replacement ? MOAS_UNKNOWN_REPLACE : MOAS_UNKNOWN_DROP;
        params.replacement = replacement.value_or(-1);
        lenient_tokens out;
        out.ids.resize(text.size());   // at most one id per byte, as tokenize()
        size_t n = 0;
        // an empty text may have no data pointer, which the library would refuse as NULL;
        // its rule is still checked
        static const char nothing = '\0';
        check(moas_tokenize_ex(detail::live(get()), text.empty() ? &nothing : text.data(),
                               text.size(), &params, out.ids.data(), out.ids.size(), &n,
                               &out.changed));
        out.ids.resize(n);
        return out;
    }

    std::string detokenize(const std::vector<int32_t> &ids) const {
        std::string text(4 * ids.size() + 1, '\0');  // a character is at most 4 bytes
        size_t length = 0;
        check(moas_detokenize(detail::live(get()), ids.data(), ids.size(), text.data(),
                              text.size(), &length));
        text.resize(length);
        return text;
    }

    /* The token's text, borrowed from the model: valid while any copy of this model (or a
     * pool or context made from it) lives. */
    std::string_view token_text(int32_t token) const {
        const char *text = moas_token_text(detail::live(get()), token);
        if (text == nullptr) {
            throw error(MOAS_ERR_INVALID_ARG, "token " + std::to_string(token) + " out of range");
        }
        return text;
    }

private:
    friend class pool;
    friend class context;
    std::shared_ptr<moas_model> ptr_;
};

/* A KV pool many contexts take pages from. It keeps its model alive, and its contexts
 * keep it alive. */
class pool {
public:
    pool(const model &m, const moas_pool_params &params) {
        moas_pool *p = nullptr;
        check(moas_pool_create(detail::live(m.get()), &params, &p));
        std::shared_ptr<moas_model> keep = m.ptr_;
        ptr_.reset(p, [keep](moas_pool *q) noexcept { moas_pool_free(q); });
    }
    moas_pool *get() noexcept { return ptr_.get(); }
    const moas_pool *get() const noexcept { return ptr_.get(); }

    /* One context's part of a decode: its tokens (a copy, so that a braced list of
     * them cannot dangle), and which logits to return. */
    struct sequence {
        context &ctx;
        std::vector<int32_t> tokens;
        moas_logits which = MOAS_LOGITS_LAST;
    };
    /* Advance the contexts of the pool in one call, each as if decoded alone (all or
     * nothing); returns each one's logits as `which` asked: none, the last token's
     * n_vocab, or every token's n_tokens x n_vocab. */
    std::vector<std::vector<float>> decode(const std::vector<sequence> &seqs);

    moas_pool_info stats() const {
        moas_pool_info info{};
        info.size = sizeof info;
        check(moas_pool_stats(detail::live(ptr_.get()), &info));
        return info;
    }

private:
    friend class context;
    std::shared_ptr<moas_pool> ptr_;
};

/* One routing decision offered to a route callback: the token at `pos` in `layer`, the
 * router's n_scheme gates, and the scheme the context would use (the forced one if set,
 * else the largest gate). */
struct route_event {
    int32_t pos;
    int32_t layer;
    const float *gates;
    int32_t n_scheme;
    int32_t proposed;
};
/* A route callback: a scheme to run (routed mode), or nullopt for the proposed one. */
using route_fn = std::function<std::optional<int32_t>(const route_event &)>;
/* An abort callback: true stops the decoding call (moas_abort_fn). */
using abort_fn = std::function<bool()>;

namespace detail {
/* What the hooks of a context's callbacks share: an exception the callback threw during
 * the call under way (kept at the C boundary, thrown again when the call returns), and
 * how many of its calls are under way (the hook must outlive them). */
struct callback_hook {
    std::exception_ptr failure;
    int running = 0;
    virtual ~callback_hook() = default;
};

struct running_guard {
    int &n;
    explicit running_guard(int &count) noexcept : n(count) { n++; }
    ~running_guard() { n--; }
};

/* What a context's C route_user points to: the token keeps its proposed scheme when
 * the callback throws, and the callback is not called again in that call. */
struct route_hook : callback_hook {
    route_fn fn;

    static int32_t call(void *user, int32_t pos, int32_t layer, const float *gates,
                        int32_t n_scheme, int32_t proposed) noexcept {
        route_hook *h = static_cast<route_hook *>(user);
        if (h->failure) {
            return proposed;
        }
        running_guard guard(h->running);
        try {
            const std::optional<int32_t> choice =
                h->fn(route_event{pos, layer, gates, n_scheme, proposed});
            return choice ? *choice : proposed;
        } catch (...) {
            h->failure = std::current_exception();
            return proposed;
        }
    }
};

/* What a context's C abort_user points to: a callback that throws stops the call (the
 * library undoes it), and its exception is thrown instead of MOAS_ERR_ABORTED. */
struct abort_hook : callback_hook {
    abort_fn fn;

    static int32_t call(void *user) noexcept {
        abort_hook *h = static_cast<abort_hook *>(user);
        if (h->failure) {
            return 1;
        }
        running_guard guard(h->running);
        try {
            return h->fn() ? 1 : 0;
        } catch (...) {
            h->failure = std::current_exception();
            return 1;
        }
    }
};

/* What a context owns, in the order it must go: the C context first, then its route
 * and abort hooks, then the model or pool. A decoding call holds its own reference for as long as
 * the C call runs, so a callback that destroys or reassigns the moas::context only drops
 * a reference: the rest goes when the call returns. */
struct context_state {
    std::shared_ptr<void> owner;   // the model or pool: declared first, so freed last
    std::unique_ptr<route_hook> route;
    std::unique_ptr<abort_hook> abort;
    std::vector<std::unique_ptr<callback_hook>> retired;   // replaced while running
    std::unique_ptr<moas_context, free_context> ptr;

    context_state(moas_context *p, std::shared_ptr<void> keep) noexcept
        : owner(std::move(keep)), ptr(p) {}

    /* After a decoding call: the first exception a callback threw during it (a
     * replaced one's first, then the route callback's, then the abort callback's),
     * taken, or null; every current hook's taken so that none is thrown by a later
     * call; the hooks replaced during it go, but one still running (this call was
     * itself made, and refused, from inside it). */
    std::exception_ptr take_callback_failure() noexcept {
        std::exception_ptr first;
        for (const auto &h : retired) {
            if (h->running == 0 && h->failure && !first) {
                first = std::exchange(h->failure, nullptr);
            }
        }
        std::exception_ptr current = route ? std::exchange(route->failure, nullptr) : nullptr;
        first = first ? first : current;
        current = abort ? std::exchange(abort->failure, nullptr) : nullptr;
        first = first ? first : current;
        retired.erase(std::remove_if(retired.begin(), retired.end(),
                                     [](const std::unique_ptr<callback_hook> &h) {
                                         return h->running == 0;
                                     }),
                      retired.end());
        return first;
    }
    void rethrow_callback_failure() {
        if (std::exception_ptr e = take_callback_failure()) {
            std::rethrow_exception(e);
        }
    }

    /* Keep `old` until its running call returns (when it was replaced from inside it),
     * else let it go now. */
    template <class Hook> void retire(std::unique_ptr<Hook> &old) noexcept {
        if (old && old->running > 0) {
            try {   // room first: the push itself then cannot fail with the hook in flight
                retired.reserve(retired.size() + 1);
            } catch (...) {
                (void)old.release();   // no room to keep it: leaked, not freed
                return;
            }
            retired.push_back(std::move(old));
        }
        old.reset();
    }
};

/* MOAS_ERR_CONTEXT_FULL, before a buffer for every token's logits is sized by a count
 * that could not fit anyway. */
inline void check_room(const moas_context *ctx, size_t n_tokens, moas_logits which,
                       const char *what) {
    const int32_t room = moas_context_n_ctx(ctx) - moas_context_n_past(ctx);
    if (which == MOAS_LOGITS_ALL && n_tokens > static_cast<size_t>(room > 0 ? room : 0)) {
        throw error(MOAS_ERR_CONTEXT_FULL,
                    std::string(what) + ": " + std::to_string(n_tokens) +
                        " token(s) do not fit: " + std::to_string(room) + " of " +
                        std::to_string(moas_context_n_ctx(ctx)) + " positions are free");
    }
}
}  // namespace detail

/* The routing of a range of positions, position-major as moas_context_routes() writes it. */
struct routing {
    std::vector<float> gates;       // [n_pos][n_layer][n_scheme]
    std::vector<int32_t> schemes;   // [n_pos][n_layer]
    std::vector<int32_t> kv_heads;  // [n_pos][n_layer]
};

class context {
public:
    /* A context with its own cache. `params` may not name a pool: use the constructors
     * that take one, which keep it alive. */
    explicit context(const model &m, const moas_context_params *params = nullptr)
        : n_vocab_(m.n_vocab()) {
        if (params != nullptr && params->pool != nullptr) {
            throw error(MOAS_ERR_INVALID_ARG, "context: pass the moas::pool itself, not "
                                              "params->pool");
        }
        create(m, params, m.ptr_);
    }
    /* A context in `pl`: `params` as given (default: mixture mode), its pool set to `pl`. */
    context(const model &m, pool &pl, moas_context_params params) : n_vocab_(m.n_vocab()) {
        params.pool = detail::live(pl.get());
        create(m, &params, pl.ptr_);
    }
    context(const model &m, pool &pl, moas_mode mode = MOAS_MODE_MIXTURE)
        : context(m, pl, default_params(mode)) {}

    /* Moves and destruction drop this object's reference to what it owns; a decoding
     * call under way (one of whose route callbacks destroys or assigns to this object)
     * keeps the rest until it returns. */
    context(context &&) noexcept = default;
    context &operator=(context &&) noexcept = default;
    ~context() = default;

    /* A new context continuing from this one's tokens, sharing its pages (in a pool),
     * with a copy of its route and abort callbacks (as the C fork keeps them). */
    context fork() {
        moas_context *p = nullptr;
        check(moas_context_fork(detail::live(get()), &p));
        context child(p, s_->owner, n_vocab_);
        if (s_->route) {   // C copied our hook as its user: the fork gets a hook of its own
            child.set_route_callback(s_->route->fn);
        }
        if (s_->abort) {
            child.set_abort_callback(s_->abort->fn);
        }
        return child;
    }

    /* Call `fn` for every token and layer as it is decoded (moas_context_set_route_callback):
     * in routed mode its answer is the scheme to run. It runs on the decoding thread and
     * must not use this context (the library refuses what would change it; replacing the
     * callback from inside it takes effect at the next token or layer; destroying this
     * object or assigning another to it is safe: the decoding call keeps the C context,
     * its hooks and its model or pool until it returns, then frees them). An exception it
     * throws is thrown again, as it was, when the decoding call (decode, or a pool's
     * decode) returns. An empty `fn` removes it. */
    void set_route_callback(route_fn fn) {
        moas_context *c = detail::live(get());
        std::unique_ptr<detail::route_hook> hook;
        if (fn) {
            hook = std::make_unique<detail::route_hook>();
            hook->fn = std::move(fn);
        }
        moas_context_set_route_callback(c, hook ? &detail::route_hook::call : nullptr,
                                        hook.get());
        // the old hook after C stopped using it; if it is running (this call comes from
        // inside it), when the decoding call returns
        s_->retire(s_->route);
        s_->route = std::move(hook);
    }

    /* Ask `fn` before each block of tokens of a decoding call and between the layers of
     * a block (moas_context_set_abort_callback): true stops the call, which throws
     * moas::error with MOAS_ERR_ABORTED and is undone (this context, and every other
     * of a pool's decode, holds the tokens and pages it had before; logits() is
     * nullptr until the next decode). It runs on the decoding thread, typically
     * reading a std::atomic<bool> another thread sets, under the same rules as a route
     * callback; one that throws stops the call as well, and its exception is thrown,
     * as it was, when the call returns. An empty `fn` removes it. */
    void set_abort_callback(abort_fn fn) {
        moas_context *c = detail::live(get());
        std::unique_ptr<detail::abort_hook> hook;
        if (fn) {
            hook = std::make_unique<detail::abort_hook>();
            hook->fn = std::move(fn);
        }
        moas_context_set_abort_callback(c, hook ? &detail::abort_hook::call : nullptr,
                                        hook.get());
        s_->retire(s_->abort);
        s_->abort = std::move(hook);
    }
    std::vector<unsigned char> save_state() const {
        std::vector<unsigned char> buf(moas_context_state_size(detail::live(get())));
        size_t written = 0;
        check(moas_context_state_save(get(), buf.data(), buf.size(), &written));
        buf.resize(written);
        return buf;
    }
    void load_state(const std::vector<unsigned char> &buf) {
        static const unsigned char none = 0;   // an empty state is malformed, not NULL
        check(moas_context_state_load(detail::live(get()), buf.empty() ? &none : buf.data(),
                                      buf.size()));
    }
    int32_t kv_pages() const noexcept { return get() ? moas_context_kv_pages(get()) : 0; }
    size_t kv_bytes_held() const noexcept {
        return get() ? moas_context_kv_bytes_held(get()) : 0;
    }

    /* Routed mode, pooled K/V: the tokens before n_before pooled down to `scheme` in
     * place, pages freed; returns the token-layer pairs that changed. */
    int32_t compact(int32_t n_before, int32_t scheme) {
        int32_t changed = 0;
        check(moas_context_compact(detail::live(get()), n_before, scheme, &changed));
        return changed;
    }
    /* RoPE models: drop positions [n_keep, n_keep + n_discard), move the later ones down. */
    void shift(int32_t n_keep, int32_t n_discard) {
        check(moas_context_shift(detail::live(get()), n_keep, n_discard));
    }
    moas_context *get() noexcept { return s_ ? s_->ptr.get() : nullptr; }
    const moas_context *get() const noexcept { return s_ ? s_->ptr.get() : nullptr; }

    /* (The decoding members touch no member after the C call: a route callback may
     * have destroyed this object. `held` keeps what the call uses.) */
    void decode(int32_t token) {
        const std::shared_ptr<detail::context_state> held = hold();
        const moas_status st = moas_context_decode(held->ptr.get(), token, nullptr);
        const std::string why = st != MOAS_OK ? moas_last_error() : std::string();
        held->rethrow_callback_failure();
        detail::check(st, why);
    }
    void decode(const std::vector<int32_t> &tokens) { decode(tokens, MOAS_LOGITS_LAST); }
    /* so that decode({}) decodes nothing and decode({a, b}) two tokens */
    void decode(std::initializer_list<int32_t> tokens) {
        decode(std::vector<int32_t>(tokens), MOAS_LOGITS_LAST);
    }
    /* Consecutive tokens, all or none; returns the logits `which` asks for: none, the
     * last token's n_vocab (also in logits()) or every token's n_tokens x n_vocab. */
    std::vector<float> decode(const std::vector<int32_t> &tokens, moas_logits which) {
        const std::shared_ptr<detail::context_state> held = hold();
        detail::check_room(held->ptr.get(), tokens.size(), which, "decode");
        std::vector<float> out(floats(which, tokens.size()));
        const moas_status st = moas_context_decode_batch(
            held->ptr.get(), tokens.data(), detail::count(tokens.size(), "decode: tokens"),
            out.empty() ? nullptr : out.data(), which);
        const std::string why = st != MOAS_OK ? moas_last_error() : std::string();
        held->rethrow_callback_failure();
        detail::check(st, why);
        return out;
    }
    /* n_vocab() floats, borrowed (see the top of this file); or nullptr. */
    const float *logits() const noexcept { return get() ? moas_context_logits(get()) : nullptr; }
    int32_t n_vocab() const noexcept { return n_vocab_; }

    int32_t n_past() const noexcept { return get() ? moas_context_n_past(get()) : 0; }
    int32_t n_ctx() const noexcept { return get() ? moas_context_n_ctx(get()) : 0; }
    /* As created: mixture, or routed (mixture once moved from). */
    moas_mode mode() const noexcept { return moas_context_mode(get()); }
    void truncate(int32_t n_keep) { check(moas_context_truncate(detail::live(get()), n_keep)); }
    void reset() noexcept {
        if (get() != nullptr) {
            moas_context_reset(get());
        }
    }

    std::vector<int32_t> scheme_counts(int32_t layer = -1) const {
        std::vector<int32_t> counts(
            static_cast<size_t>(moas_model_n_scheme(moas_context_model(detail::live(get())))));
        check(moas_context_scheme_counts(get(), layer, counts.data()));
        return counts;
    }
    size_t kv_bytes_used(int32_t layer = -1) const noexcept {
        return get() ? moas_context_kv_bytes_used(get(), layer) : 0;
    }
    /* Bytes allocated for keys and values at capacity, in `layer` or all layers (-1). */
    size_t kv_bytes_reserved(int32_t layer = -1) const noexcept {
        return get() ? moas_context_kv_bytes_reserved(get(), layer) : 0;
    }
    /* Bytes of one token over all layers: -1 mixture mode's, s routed to scheme s. */
    uint64_t kv_token_bytes(int32_t scheme) const noexcept {
        return get() ? moas_context_kv_token_bytes(get(), scheme) : 0;
    }

    /* The routing of positions [pos, pos + n_pos), all of them stored (moas_context_routes). */
    routing routes(int32_t pos, int32_t n_pos) const {
        const moas_context *c = detail::live(get());
        const moas_model *m = moas_context_model(c);
        // buffers only for a range the context holds: the library refuses any other
        // before writing, and sizing them by n_pos first could ask for gigabytes
        const bool held = pos >= 0 && n_pos >= 0 &&
                          static_cast<int64_t>(pos) + n_pos <= moas_context_n_past(c);
        const size_t pairs =
            held ? static_cast<size_t>(n_pos) * static_cast<size_t>(moas_model_n_layer(m)) : 0;
        routing r;
        r.gates.resize(pairs * static_cast<size_t>(moas_model_n_scheme(m)));
        r.schemes.resize(pairs);
        r.kv_heads.resize(pairs);
        check(moas_context_routes(c, pos, n_pos, r.gates.data(), r.schemes.data(),
                                  r.kv_heads.data()));
        return r;
    }
    /* Routed mode: run `scheme` for every following token; -1 gives the choice back to
     * the router. */
    void force_scheme(int32_t scheme) {
        check(moas_context_force_scheme(detail::live(get()), scheme));
    }
    /* Cap the KV bytes the context may use (kv_bytes_used(-1)); 0 removes the cap. */
    void set_kv_budget(uint64_t bytes) {
        check(moas_context_set_kv_budget(detail::live(get()), bytes));
    }
    /* Threads a decoding call uses. */
    int32_t n_threads() const noexcept { return get() ? moas_context_n_threads(get()) : 0; }
    /* The kernels the context chose, e.g. "ref"; "" once moved from. */
    std::string_view kernels_name() const noexcept {
        return get() ? moas_context_kernels_name(get()) : "";
    }

private:
    friend class pool;
    context(moas_context *p, std::shared_ptr<void> owner, int32_t n_vocab)
        : s_(make_state(p, std::move(owner))), n_vocab_(n_vocab) {}
    static moas_context_params default_params(moas_mode mode) noexcept {
        moas_context_params params;
        moas_context_params_init(&params);
        params.mode = mode;
        return params;
    }
    /* The state owning p (freed here if the state cannot be made). */
    static std::shared_ptr<detail::context_state> make_state(moas_context *p,
                                                             std::shared_ptr<void> owner) {
        std::unique_ptr<moas_context, free_context> guard(p);
        auto st = std::make_shared<detail::context_state>(nullptr, std::move(owner));
        st->ptr = std::move(guard);
        return st;
    }
    void create(const model &m, const moas_context_params *params, std::shared_ptr<void> owner) {
        moas_context *p = nullptr;
        check(moas_context_create(detail::live(m.get()), params, &p));
        s_ = make_state(p, std::move(owner));
    }
    /* A reference for a decoding call to hold, or moas::error if moved from. */
    std::shared_ptr<detail::context_state> hold() const {
        if (!s_) {
            throw error(MOAS_ERR_INVALID_ARG, "a moved-from object was used");
        }
        return s_;
    }
    size_t floats(moas_logits which, size_t n_tokens) const {
        const size_t n_vocab = static_cast<size_t>(n_vocab_);
        return which == MOAS_LOGITS_ALL ? n_tokens * n_vocab
               : which == MOAS_LOGITS_LAST && n_tokens > 0 ? n_vocab
                                                           : 0;
    }

    std::shared_ptr<detail::context_state> s_;   // null once moved from
    int32_t n_vocab_ = 0;
};

inline std::vector<std::vector<float>> pool::decode(const std::vector<sequence> &seqs) {
    std::vector<std::vector<float>> outs;
    std::vector<moas_pool_seq> parts;
    std::vector<std::shared_ptr<detail::context_state>> held;   // whatever the callbacks do
    outs.reserve(seqs.size());
    parts.reserve(seqs.size());
    held.reserve(seqs.size());
    for (const sequence &s : seqs) {
        held.push_back(s.ctx.hold());
        detail::check_room(held.back()->ptr.get(), s.tokens.size(), s.which, "pool decode");
    }
    for (size_t i = 0; i < seqs.size(); i++) {
        const sequence &s = seqs[i];
        outs.emplace_back(s.ctx.floats(s.which, s.tokens.size()));
        parts.push_back({held[i]->ptr.get(), s.tokens.data(),
                         detail::count(s.tokens.size(), "pool decode: tokens"), s.which,
                         outs.back().empty() ? nullptr : outs.back().data()});
    }
    const moas_status st = moas_pool_decode(detail::live(get()), parts.data(),
                                            detail::count(parts.size(), "pool decode"));
    const std::string why = st != MOAS_OK ? moas_last_error() : std::string();
    std::exception_ptr first;   // every context's taken, the first thrown
    for (const auto &h : held) {
        std::exception_ptr e = h->take_callback_failure();
        first = first ? first : e;
    }
    if (first) {
        std::rethrow_exception(first);
    }
    detail::check(st, why);
    return outs;
}

/* A sampler for one model's logits. */
class sampler {
public:
    explicit sampler(int32_t n_vocab, const moas_sampler_params *params = nullptr)
        : n_vocab_(n_vocab) {
        moas_sampler *p = nullptr;
        check(moas_sampler_create(params, n_vocab, &p));
        ptr_.reset(p);
    }
    moas_sampler *get() noexcept { return ptr_.get(); }
    const moas_sampler *get() const noexcept { return ptr_.get(); }

    /* A token from the context's last logits (moas::error if it has none yet, or if
     * its model's vocabulary is not the sampler's). */
    int32_t sample(const context &ctx) {
        if (ctx.logits() == nullptr) {
            throw error(MOAS_ERR_INVALID_ARG, "sample: the context has no logits (nothing "
                                              "decoded since it was made, truncated or reset)");
        }
        return sample(ctx.logits(), static_cast<size_t>(ctx.n_vocab()));
    }
    /* A token from `n` logits; n must be the sampler's n_vocab. */
    int32_t sample(const float *logits, size_t n) {
        if (n != static_cast<size_t>(n_vocab_)) {
            throw error(MOAS_ERR_INVALID_ARG, "sample: " + std::to_string(n) +
                                                  " logits for a sampler of " +
                                                  std::to_string(n_vocab_));
        }
        int32_t token = 0;
        check(moas_sampler_sample(detail::live(get()), logits, &token));
        return token;
    }
    /* A token chosen elsewhere, for the repetition penalty's history. */
    void accept(int32_t token) { check(moas_sampler_accept(detail::live(get()), token)); }
    void reset() { moas_sampler_reset(detail::live(get())); }
    void reseed(uint64_t seed) { moas_sampler_reseed(detail::live(get()), seed); }

private:
    int32_t n_vocab_;
    std::unique_ptr<moas_sampler, free_sampler> ptr_;
};

/* Where generated text meets a stop string, as find_stop() says. */
struct stop_match {
    size_t end;   // bytes: found, keep text[0, end) and stop; else text[0, end) can be shown
    bool found;
};

/* Look in `text`, generated and not yet shown, for the first place where one of `stops`
 * occurs whole (moas_text_find_stop; empty ones are ignored): {its offset, true}.
 * Otherwise {n, false}: text[0, n) can be shown, and while `more` text may follow, the
 * rest is the start of a stop string, held back to be looked at again with what follows
 * it; with `more` false, n is the whole text. */
inline stop_match find_stop(std::string_view text, const std::vector<std::string> &stops,
                            bool more = true) {
    std::vector<const char *> c_stops;
    c_stops.reserve(stops.size());
    for (const std::string &s : stops) {
        if (s.find('\0') != std::string::npos) {   // C would see it end at the NUL
            throw error(MOAS_ERR_INVALID_ARG, "find_stop: a stop string contains NUL");
        }
        c_stops.push_back(s.c_str());
    }
    size_t end = 0;
    int32_t found = 0;
    check(moas_text_find_stop(text.data(), text.size(), c_stops.data(), c_stops.size(),
                              more ? 1 : 0, &end, &found));
    return {end, found != 0};
}

}  // namespace moas

#endif  // MOAS_HPP
