/*
 * test_cpp_wrapper.cpp - examples/cpp/moas.hpp keeps what the C API leaves to the
 * caller: lifetimes (a context outliving its model or pool), sizes (no int32_t
 * wrapping, a sampler reading past the logits), and calls on moved-from objects. Each
 * case failed, crashed or read freed memory before the wrapper kept them. Its
 * accessors (routing, budget, tokenizer rules, status names) give what the C API gives.
 *
 *     test_cpp_wrapper MODEL      (exit status 0, or 1 naming the failed check)
 */
#include "moas.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

static int failures = 0;

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            std::fprintf(stderr, "test_cpp_wrapper:%d: %s\n", __LINE__, #cond); \
            failures++;                                                          \
        }                                                                        \
    } while (0)

/* The status of what `f` throws, or MOAS_OK when it returns. */
template <typename F> static moas_status status_of(F &&f) {
    try {
        f();
    } catch (const moas::error &e) {
        return e.status();
    }
    return MOAS_OK;
}

static moas::context context_of_a_model_gone(const char *path) {
    moas::model m(path);
    return moas::context(m);   // the model object ends here; the context keeps it
}

static bool same(const float *a, const float *b, size_t n) {
    return a != nullptr && b != nullptr && std::memcmp(a, b, n * sizeof(float)) == 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL\n", argv[0]);
        return 2;
    }
    static_assert(std::is_nothrow_copy_constructible_v<moas::error>);
    // a const pool or sampler still gives its handle, for the C API's const getters
    static_assert(std::is_same_v<decltype(std::declval<const moas::pool &>().get()),
                                 const moas_pool *>);
    static_assert(std::is_same_v<decltype(std::declval<const moas::sampler &>().get()),
                                 const moas_sampler *>);

    // status names are the C library's, "MOAS_UNKNOWN" outside its table included
    CHECK(std::string(moas::status_name(MOAS_ERR_IO)) == "MOAS_ERR_IO");
    CHECK(std::string(moas::status_name(static_cast<moas_status>(-999))) == "MOAS_UNKNOWN");
    CHECK(std::string(moas::error(static_cast<moas_status>(1), "why").what()) ==
          "MOAS_UNKNOWN (unknown status): why");
    try {
        const moas::model model(argv[1]);
        const size_t n_vocab = static_cast<size_t>(model.n_vocab());
        const std::vector<int32_t> ids = model.tokenize("And God said, Let there be light");
        moas::context reference(model);
        reference.decode(ids);

        // a context outliving the model object it was made from
        moas::context orphan = context_of_a_model_gone(argv[1]);
        orphan.decode(ids);
        CHECK(same(orphan.logits(), reference.logits(), n_vocab));

        // contexts (and a fork) outliving their pool object
        moas_pool_params pp;
        moas_pool_params_init(&pp);
        pp.capacity_bytes = 1u << 20;
        std::optional<moas::pool> pl(std::in_place, model, pp);
        moas::context in_pool(model, *pl);
        in_pool.decode(std::vector<int32_t>(ids.begin(), ids.begin() + 10));
        moas::context fork = in_pool.fork();
        pl.reset();
        in_pool.decode(std::vector<int32_t>(ids.begin() + 10, ids.end()));
        fork.decode(std::vector<int32_t>(ids.begin() + 10, ids.end()));
        CHECK(same(in_pool.logits(), reference.logits(), n_vocab));
        CHECK(same(fork.logits(), reference.logits(), n_vocab));

        // MOAS_ERR_POOL_FULL names the pages lacking (in moas_last_error() alone):
        // that many pages more and the decode fits, one fewer and one page lacks
        {
            const uint64_t page = moas::pool(model, pp).stats().page_bytes;
            const auto lacking_in = [&](uint64_t n_pages) -> std::optional<uint64_t> {
                moas_pool_params small = pp;
                small.capacity_bytes = n_pages * page;
                moas::pool p(model, small);
                moas::context c(model, p);
                try {
                    c.decode(ids);
                } catch (const moas::error &e) {
                    CHECK(e.status() == MOAS_ERR_POOL_FULL);
                    return e.pages_lacking();
                }
                return 0;   // it fits
            };
            const std::optional<uint64_t> lacking = lacking_in(2);
            CHECK(lacking && *lacking > 0);
            if (lacking) {
                CHECK(lacking_in(2 + *lacking) == std::optional<uint64_t>(0));
                CHECK(lacking_in(1 + *lacking) == std::optional<uint64_t>(1));
            }
            CHECK(!moas::error(MOAS_ERR_BUSY, "the KV pool lacks 3 page(s)").pages_lacking());
        }

        // a context assigned over one whose pool object is gone: the old context is freed
        // before its pool (the default move assignment freed the pool first)
        {
            std::optional<moas::pool> p2(std::in_place, model, pp);
            moas::context c(model, *p2);
            c.decode(ids[0]);
            p2.reset();
            c = moas::context(model);
            c.decode(ids);
            CHECK(same(c.logits(), reference.logits(), n_vocab));
        }
        // pool::decode's sequences own their tokens: a braced list does not dangle
        {
            moas::pool p3(model, pp);
            moas::context c(model, p3);
            std::vector<moas::pool::sequence> step;
            step.push_back({c, {ids[0], ids[1], ids[2]}});
            p3.decode(step);
            CHECK(c.n_past() == 3);
        }

        // decode({}) decodes nothing (it used to pick decode(int32_t) and decode token 0)
        moas::context empty(model);
        empty.decode({});
        CHECK(empty.n_past() == 0);

        // every token's logits, alone and through a pool, equal decoding one by one
        moas::context one(model);
        std::vector<float> each;
        for (int32_t t : ids) {
            one.decode(t);
            each.insert(each.end(), one.logits(), one.logits() + n_vocab);
        }
        moas::context all(model);
        CHECK(all.decode(ids, MOAS_LOGITS_ALL) == each);
        moas::pool pool2(model, pp);
        moas::context a(model, pool2), b(model, pool2);
        const std::vector<int32_t> head(ids.begin(), ids.begin() + 5);
        const auto outs = pool2.decode({{a, ids, MOAS_LOGITS_ALL}, {b, head, MOAS_LOGITS_NONE}});
        CHECK(outs.size() == 2 && outs[0] == each && outs[1].empty());
        CHECK(b.n_past() == 5);

        // a sampler reads only as many logits as it was made for
        moas::sampler wide(static_cast<int32_t>(n_vocab) + 100);
        CHECK(status_of([&] { wide.sample(reference); }) == MOAS_ERR_INVALID_ARG);
        moas::sampler greedy(static_cast<int32_t>(n_vocab));
        CHECK(status_of([&] { greedy.sample(reference); }) == MOAS_OK);
        CHECK(status_of([&] { greedy.sample(empty); }) == MOAS_ERR_INVALID_ARG);
        const moas::sampler &const_greedy = greedy;
        const moas::pool &const_pool = pool2;
        CHECK(const_greedy.get() == greedy.get() && const_greedy.get() != nullptr);
        CHECK(const_pool.get() == pool2.get() && const_pool.get() != nullptr);

        // an empty state is malformed (not "NULL buffer"); nothing changes
        CHECK(status_of([&] { one.load_state({}); }) == MOAS_ERR_BAD_FORMAT);
        CHECK(one.n_past() == static_cast<int32_t>(ids.size()));

        // moved-from objects: accessors give 0 or nullptr, calls throw, nothing crashes
        moas::context moved(model);
        moas::context into = std::move(moved);
        CHECK(moved.n_past() == 0 && moved.logits() == nullptr && moved.kv_bytes_used() == 0);
        moved.reset();
        CHECK(status_of([&] { moved.decode(1); }) == MOAS_ERR_INVALID_ARG);
        CHECK(status_of([&] { moved.scheme_counts(); }) == MOAS_ERR_INVALID_ARG);
        moas::model m2(argv[1]);
        moas::model m3 = std::move(m2);
        CHECK(m2.n_vocab() == 0 && m3.n_vocab() == model.n_vocab());
        CHECK(status_of([&] { m2.tokenize("A"); }) == MOAS_ERR_INVALID_ARG);
        (void)into;

        // route callbacks: steering routed mode, every (position, layer) once
        {
            moas_context_params rp;
            moas_context_params_init(&rp);
            rp.mode = MOAS_MODE_ROUTED;
            const int32_t last = model.n_scheme() - 1;
            const int32_t n_layer = model.n_layer();
            int calls = 0;
            moas::context steered(model, &rp);
            CHECK(steered.mode() == MOAS_MODE_ROUTED && reference.mode() == MOAS_MODE_MIXTURE);
            steered.set_route_callback([&](const moas::route_event &e) -> std::optional<int32_t> {
                calls += e.n_scheme == model.n_scheme() && e.proposed >= 0 ? 1 : 1000;
                return last;
            });
            steered.decode(ids);
            CHECK(calls == static_cast<int>(ids.size()) * n_layer);
            CHECK(steered.scheme_counts(-1).back() == static_cast<int32_t>(ids.size()) * n_layer);
            rp.forced_scheme = last;
            moas::context forced(model, &rp);
            forced.decode(ids);
            CHECK(same(steered.logits(), forced.logits(), n_vocab));
            steered.set_route_callback(nullptr);   // removed
            steered.truncate(0);
            steered.decode(ids);
            CHECK(calls == static_cast<int>(ids.size()) * n_layer);

            // an exception comes back from the decoding call, as it was thrown
            moas::context throws(model);
            int seen = 0;
            throws.set_route_callback([&](const moas::route_event &e) -> std::optional<int32_t> {
                seen++;
                if (e.pos == 3) {
                    throw std::runtime_error("no position 3");
                }
                return std::nullopt;
            });
            throws.decode(std::vector<int32_t>(ids.begin(), ids.begin() + 3));
            bool caught = false;
            try {
                throws.decode(ids[3]);
            } catch (const std::runtime_error &e) {
                caught = std::string(e.what()) == "no position 3";
            }
            CHECK(caught && throws.n_past() == 4 && seen == 3 * n_layer + 1);
            throws.decode(ids[4]);   // and on as before
            CHECK(seen == 3 * n_layer + 1 + n_layer);

            // in a pool call; a fork has a copy of its parent's callback, and the parent
            // may go first
            moas::pool p4(model, pp);
            moas::context parent(model, p4, MOAS_MODE_ROUTED);
            moas::context other(model, p4, MOAS_MODE_ROUTED);
            int pool_calls = 0;
            parent.set_route_callback([&](const moas::route_event &) -> std::optional<int32_t> {
                pool_calls++;
                return 0;
            });
            p4.decode({{parent, {ids[0], ids[1]}}, {other, {ids[0]}}});
            CHECK(pool_calls == 2 * n_layer);
            std::optional<moas::context> child(parent.fork());
            { moas::context gone = std::move(parent); }
            child->decode(ids[2]);
            CHECK(pool_calls == 3 * n_layer);
            child->set_route_callback(nullptr);
            other.set_route_callback([](const moas::route_event &) -> std::optional<int32_t> {
                throw std::runtime_error("other");
            });
            std::string thrown;
            try {
                p4.decode({{*child, {ids[3]}}, {other, {ids[1]}}});
            } catch (const std::runtime_error &e) {
                thrown = e.what();
            }
            CHECK(thrown == "other" && child->n_past() == 4 && other.n_past() == 2);

            // two callbacks of one pool call throw: the first is thrown, both are taken
            // (neither comes back from a later call)
            child->set_route_callback([](const moas::route_event &) -> std::optional<int32_t> {
                throw std::runtime_error("child");
            });
            thrown.clear();
            try {
                p4.decode({{*child, {ids[4]}}, {other, {ids[2]}}});
            } catch (const std::runtime_error &e) {
                thrown = e.what();
            }
            CHECK(thrown == "child");
            child->set_route_callback(nullptr);
            other.set_route_callback(nullptr);
            CHECK(status_of([&] { p4.decode({{*child, {ids[5]}}, {other, {ids[3]}}}); }) ==
                  MOAS_OK);

            // a callback that replaces itself: it runs to its end, the new one from the
            // next layer on
            moas::context self_set(model);
            int first_calls = 0, second_calls = 0;
            const std::string kept = "captured by value";
            self_set.set_route_callback(
                [&, kept](const moas::route_event &) -> std::optional<int32_t> {
                    first_calls++;
                    self_set.set_route_callback(
                        [&](const moas::route_event &) -> std::optional<int32_t> {
                            second_calls++;
                            return std::nullopt;
                        });
                    CHECK(kept == "captured by value");   // this closure is still alive
                    return std::nullopt;
                });
            self_set.decode(ids[0]);
            CHECK(first_calls == 1 && second_calls == n_layer - 1);

            // ... and one that replaces itself, then calls a decode of its own context:
            // refused by the library, thrown back after the outer call, and the running
            // closure is not freed by the refused call's clean-up
            moas::context nested(model);
            bool still_alive = false;
            nested.set_route_callback(
                [&, kept](const moas::route_event &) -> std::optional<int32_t> {
                    nested.set_route_callback(nullptr);
                    nested.decode(ids[1]);   // throws: the context is being decoded
                    still_alive = kept == "captured by value";
                    return std::nullopt;
                });
            CHECK(status_of([&] { nested.decode(ids[0]); }) == MOAS_ERR_BUSY);
            CHECK(!still_alive && nested.n_past() == 1);

            // a context with a callback moved into another: the callback goes with it
            int moved_calls = 0;
            std::optional<moas::context> source(std::in_place, model);
            source->set_route_callback([&](const moas::route_event &) -> std::optional<int32_t> {
                moved_calls++;
                return std::nullopt;
            });
            moas::context target(model);
            target.decode(ids[0]);
            target = std::move(*source);
            source.reset();   // the moved-from object goes; the hook went with the context
            target.decode(ids[0]);
            CHECK(moved_calls == n_layer);

            // a callback that destroys its own context, the last owner of its model: the
            // decode runs to its end on what it holds, all of it freed when it returns
            // (the model was unmapped under the decode, then the hooks read after free)
            {
                auto m = std::make_unique<moas::model>(argv[1]);
                auto doomed = std::make_unique<moas::context>(*m);
                m.reset();
                int after = 0;
                doomed->set_route_callback([&](const moas::route_event &) -> std::optional<int32_t> {
                    if (doomed) {
                        doomed.reset();
                    } else {
                        after++;
                    }
                    return std::nullopt;
                });
                moas::context *running = doomed.get();
                const std::vector<float> all_logits = running->decode(ids, MOAS_LOGITS_ALL);
                CHECK(!doomed && after == static_cast<int>(ids.size()) * n_layer - 1);
                CHECK(all_logits.size() == ids.size() * n_vocab &&
                      same(all_logits.data() + all_logits.size() - n_vocab, reference.logits(),
                           n_vocab));
            }
            // ... or assigns another context to it, in one token's decode and in a pool call
            // whose other context it destroys
            {
                auto m = std::make_unique<moas::model>(argv[1]);
                moas::context replaced(*m);
                m.reset();
                replaced.set_route_callback([&](const moas::route_event &) -> std::optional<int32_t> {
                    replaced = moas::context(model);
                    return std::nullopt;
                });
                replaced.decode(ids[0]);
                CHECK(replaced.n_past() == 0);
                replaced.decode(ids);   // the new context, without a callback
                CHECK(same(replaced.logits(), reference.logits(), n_vocab));

                std::optional<moas::pool> p5(std::in_place, model, pp);
                moas::context killer(model, *p5);
                std::optional<moas::context> victim(std::in_place, model, *p5);
                killer.set_route_callback([&](const moas::route_event &) -> std::optional<int32_t> {
                    victim.reset();
                    return std::nullopt;
                });
                moas::context &victim_ref = *victim;
                p5->decode({{killer, {ids[0], ids[1]}}, {victim_ref, {ids[0]}}});
                CHECK(!victim && killer.n_past() == 2);
                p5.reset();
                killer.set_route_callback(nullptr);
                killer.decode(std::vector<int32_t>(ids.begin() + 2, ids.end()));
                CHECK(same(killer.logits(), reference.logits(), n_vocab));
            }
        }

        // every token's logits asked for more tokens than fit: refused before a buffer
        // for them is sized (it was, n_tokens x n_vocab floats, then the library refused)
        {
            moas::context small(model);
            moas::pool p6(model, pp);
            moas::context pooled(model, p6);
            small.decode(ids[0]);
            const std::vector<int32_t> too_many(static_cast<size_t>(small.n_ctx()), ids[0]);
            std::string said;
            try {
                small.decode(too_many, MOAS_LOGITS_ALL);
            } catch (const moas::error &e) {
                said = e.message();
            }
            CHECK(said.rfind("decode: ", 0) == 0 && small.n_past() == 1);
            const std::vector<int32_t> past_end(too_many.size() + 1, ids[0]);
            CHECK(status_of([&] { p6.decode({{pooled, past_end, MOAS_LOGITS_ALL}}); }) ==
                  MOAS_ERR_CONTEXT_FULL);
            CHECK(pooled.n_past() == 0);
            CHECK(status_of([&] { small.decode(too_many, MOAS_LOGITS_NONE); }) ==
                  MOAS_ERR_CONTEXT_FULL);   // the library's own refusal
            CHECK(small.n_past() == 1);
        }

        // abort callbacks: asked before the block and between its layers; stopped at
        // either, a call throws MOAS_ERR_ABORTED and leaves every context of it as it was
        {
            const int32_t n_layer = model.n_layer();
            moas_pool_params one_thread = pp;   // with two, a block of two even sequences
            one_thread.n_threads = 1;           // is asked before it only (moas_abort_fn)
            moas::pool p7(model, one_thread);
            moas::context stopped(model, p7, MOAS_MODE_ROUTED);
            moas::context plain(model, p7, MOAS_MODE_ROUTED);
            moas::context never(model, p7, MOAS_MODE_ROUTED);
            const std::vector<int32_t> head(ids.begin(), ids.begin() + 3);
            const std::vector<int32_t> tail(ids.begin() + 3, ids.end());
            stopped.decode(head);
            plain.decode(head);
            never.decode(head);
            const std::vector<float> want = never.decode(tail, MOAS_LOGITS_ALL);
            const auto state = [&](const moas::context &c) {
                return std::make_tuple(c.n_past(), c.kv_bytes_used(), c.kv_pages(),
                                       c.scheme_counts(-1));
            };
            const auto before = state(stopped), plain_before = state(plain);
            const int32_t free_before = p7.stats().pages_free;
            int asked = 0, stop_at = 0;
            stopped.set_abort_callback([&] { return ++asked == stop_at; });
            for (stop_at = 1; stop_at <= n_layer; stop_at++) {
                asked = 0;
                CHECK(status_of([&] { stopped.decode(tail, MOAS_LOGITS_ALL); }) ==
                      MOAS_ERR_ABORTED);
                CHECK(asked == stop_at && state(stopped) == before);
                CHECK(stopped.logits() == nullptr && p7.stats().pages_free == free_before);
                // a pool call: the context without a callback is undone as well
                asked = 0;
                CHECK(status_of([&] { p7.decode({{plain, tail}, {stopped, tail}}); }) ==
                      MOAS_ERR_ABORTED);
                CHECK(state(plain) == plain_before && state(stopped) == before);
                CHECK(plain.logits() == nullptr && p7.stats().pages_free == free_before);
            }
            // not stopped: every ask made, the bits of the context never stopped
            stop_at = 0;
            asked = 0;
            CHECK(stopped.decode(tail, MOAS_LOGITS_ALL) == want && asked == n_layer);
            // a fork keeps a copy of its own: removing the parent's leaves it
            std::optional<moas::context> child(stopped.fork());
            stopped.set_abort_callback(nullptr);
            asked = 0;
            stop_at = 1;
            CHECK(status_of([&] { child->decode(ids[0]); }) == MOAS_ERR_ABORTED);
            CHECK(asked == 1 && child->n_past() == static_cast<int32_t>(ids.size()));
            stopped.decode(ids[0]);   // removed from the parent: not asked
            CHECK(asked == 1);
            // an exception stops the call, and comes back from it as it was thrown
            child->set_abort_callback([]() -> bool { throw std::runtime_error("stop it"); });
            std::string thrown;
            try {
                p7.decode({{plain, tail}, {*child, {ids[0]}}});
            } catch (const std::runtime_error &e) {
                thrown = e.what();
            }
            CHECK(thrown == "stop it" && state(plain) == plain_before);
            CHECK(child->n_past() == static_cast<int32_t>(ids.size()));
            // a callback that removes itself: it runs to its end, and is asked no more
            bool kept_alive = false;
            const std::string kept = "captured by value";
            child->set_abort_callback([&, kept] {
                child->set_abort_callback(nullptr);
                kept_alive = kept == "captured by value";
                return false;
            });
            child->decode(ids[0]);
            CHECK(kept_alive && child->n_past() == static_cast<int32_t>(ids.size()) + 1);
            CHECK(same(child->logits(), stopped.logits(), n_vocab));
        }

        // the routing accessors, against the C API and the figures moas.h and
        // docs/KV_CACHE.md give for this model (2 layers, schemes of 6, 2 and 1 KV heads of
        // 8 floats, independent K/V per scheme)
        {
            const int32_t n_layer = model.n_layer(), n_scheme = model.n_scheme();
            const size_t head_bytes = 8 * 2 * sizeof(float);   // K and V of one head, f32
            CHECK(n_layer == 2 && n_scheme == 3 &&
                  model.kv_sharing() == MOAS_KV_SHARING_INDEPENDENT);
            moas_context_params rp;
            moas_context_params_init(&rp);
            rp.mode = MOAS_MODE_ROUTED;
            rp.kernels = MOAS_KERNELS_REF;
            rp.n_threads = 2;
            moas::context routed(model, &rp);
            CHECK(routed.kernels_name() == "ref");
            CHECK(routed.n_threads() >= 1 &&
                  routed.n_threads() == moas_context_n_threads(routed.get()));
            routed.decode(ids);
            const int32_t n = static_cast<int32_t>(ids.size());
            const size_t pairs = ids.size() * static_cast<size_t>(n_layer);
            const moas::routing r = routed.routes(0, n);
            std::vector<float> gates(pairs * static_cast<size_t>(n_scheme));
            std::vector<int32_t> schemes(pairs), heads(pairs);
            CHECK(moas_context_routes(routed.get(), 0, n, gates.data(), schemes.data(),
                                      heads.data()) == MOAS_OK);
            CHECK(r.gates == gates && r.schemes == schemes && r.kv_heads == heads);
            size_t stored_heads = 0;
            for (size_t i = 0; i < pairs; i++) {
                CHECK(r.kv_heads[i] == moas_model_scheme_n_kv(model.get(), r.schemes[i]));
                stored_heads += static_cast<size_t>(r.kv_heads[i]);
            }
            CHECK(routed.kv_bytes_used() == stored_heads * head_bytes + 5 * pairs);
            const moas::routing last_two = routed.routes(n - 2, 2);
            CHECK(last_two.schemes.size() == 2 * static_cast<size_t>(n_layer) &&
                  std::equal(last_two.schemes.begin(), last_two.schemes.end(),
                             r.schemes.end() - 2 * n_layer));
            CHECK(routed.routes(n, 0).schemes.empty());
            // outside the stored tokens: refused, and no buffer sized by the request first
            CHECK(status_of([&] { routed.routes(0, n + 1); }) == MOAS_ERR_INVALID_ARG);
            CHECK(status_of([&] { routed.routes(1, INT32_MAX); }) == MOAS_ERR_INVALID_ARG);
            CHECK(status_of([&] { routed.routes(-1, 1); }) == MOAS_ERR_INVALID_ARG);
            // routed: room for the widest scheme (6 heads) and 5 bytes at every position
            const size_t n_ctx = static_cast<size_t>(routed.n_ctx());
            CHECK(routed.kv_bytes_reserved(0) == n_ctx * (6 * head_bytes + 5));
            CHECK(routed.kv_bytes_reserved() == 2 * routed.kv_bytes_reserved(0) &&
                  routed.kv_bytes_reserved() == moas_context_kv_bytes_reserved(routed.get(), -1));
            CHECK(routed.kv_bytes_reserved(n_layer) == 0);

            // forcing scheme s runs s at every token and layer
            for (int32_t s = 0; s < n_scheme; s++) {
                moas::context forced(model, &rp);
                forced.force_scheme(s);
                forced.decode(ids);
                std::vector<int32_t> want(static_cast<size_t>(n_scheme), 0);
                want[static_cast<size_t>(s)] = n * n_layer;
                CHECK(forced.scheme_counts(-1) == want);
                const moas::routing fr = forced.routes(0, n);
                CHECK(std::all_of(fr.schemes.begin(), fr.schemes.end(),
                                  [s](int32_t x) { return x == s; }));
            }
            // ... from the next token on, and -1 gives the choice back to the router: the
            // largest gate (the first of equal ones), with no budget or callback
            moas::context once(model, &rp);
            once.force_scheme(2);
            once.decode(ids[0]);
            once.force_scheme(-1);
            once.decode(ids[1]);
            const moas::routing two = once.routes(0, 2);
            for (int32_t l = 0; l < n_layer; l++) {
                CHECK(two.schemes[static_cast<size_t>(l)] == 2);
                const float *g = two.gates.data() + static_cast<size_t>((n_layer + l) * n_scheme);
                CHECK(two.schemes[static_cast<size_t>(n_layer + l)] ==
                      static_cast<int32_t>(std::max_element(g, g + n_scheme) - g));
            }
            CHECK(status_of([&] { once.force_scheme(n_scheme); }) == MOAS_ERR_INVALID_ARG);
            // (mixture mode)
            CHECK(status_of([&] { reference.force_scheme(0); }) == MOAS_ERR_INVALID_ARG);

            // a KV budget in mixture mode only limits the number of tokens
            moas::context capped(model);
            const uint64_t per_token = capped.kv_token_bytes(-1);
            CHECK(per_token == static_cast<uint64_t>(n_layer) * (6 + 2 + 1) * head_bytes);
            CHECK(capped.kv_bytes_reserved(0) ==
                  static_cast<size_t>(capped.n_ctx()) * (6 + 2 + 1) * head_bytes);
            capped.set_kv_budget(3 * per_token);
            capped.decode({ids[0], ids[1], ids[2]});
            CHECK(status_of([&] { capped.decode(ids[3]); }) == MOAS_ERR_CONTEXT_FULL);
            CHECK(capped.n_past() == 3 && capped.kv_bytes_used() == 3 * per_token);
            capped.set_kv_budget(0);   // no cap
            capped.decode(ids[3]);
            CHECK(capped.n_past() == 4);
            CHECK(status_of([&] { capped.set_kv_budget(1); }) == MOAS_ERR_INVALID_ARG);

            // moved from: 0 or "", and the calls throw
            moas::context from(model);
            moas::context to = std::move(from);
            CHECK(from.n_threads() == 0 && from.kernels_name().empty() &&
                  from.kv_bytes_reserved() == 0 && to.n_threads() >= 1);
            CHECK(status_of([&] { from.routes(0, 0); }) == MOAS_ERR_INVALID_ARG);
            CHECK(status_of([&] { from.force_scheme(-1); }) == MOAS_ERR_INVALID_ARG);
            CHECK(status_of([&] { from.set_kv_budget(0); }) == MOAS_ERR_INVALID_ARG);
        }

        // characters outside the vocabulary replaced or dropped (moas_tokenize_ex)
        {
            const int32_t a = 11, n = 33, d = 24, sp = 1, nl = 0;   // 'A' 'n' 'd' ' ' '\n'
            CHECK(model.tokenize("And \n") == std::vector<int32_t>({a, n, d, sp, nl}));
            CHECK(status_of([&] { model.tokenize("And Q7\r\n"); }) == MOAS_ERR_UNKNOWN_CHAR);
            const auto replaced = model.tokenize_lenient("And Q7\r\n", sp);
            CHECK(replaced.ids == std::vector<int32_t>({a, n, d, sp, sp, sp, sp, nl}) &&
                  replaced.changed == 3);
            const auto dropped = model.tokenize_lenient("And Q7\r\n", std::nullopt);
            CHECK(dropped.ids == std::vector<int32_t>({a, n, d, sp, nl}) && dropped.changed == 3);
            const auto none = model.tokenize_lenient("", std::nullopt);
            CHECK(none.ids.empty() && none.changed == 0);
            CHECK(status_of([&] { model.tokenize_lenient("And", 47); }) == MOAS_ERR_INVALID_ARG);
            CHECK(status_of([&] { model.tokenize_lenient("", 47); }) == MOAS_ERR_INVALID_ARG);
            CHECK(status_of([&] { model.tokenize_lenient("A\xff", std::nullopt); }) ==
                  MOAS_ERR_INVALID_UTF8);
        }

        // stop strings: the C library's hand-computed cases (tests/test_sampler.c)
        {
            const std::vector<std::string> stops = {"\n\n", "", "Amen"};
            const auto at = [&](std::string_view text, bool more) {
                const moas::stop_match m = moas::find_stop(text, stops, more);
                return std::make_pair(m.end, m.found);
            };
            using result = std::pair<size_t, bool>;
            CHECK(at("And it was so.\n\nAnd", true) == result(14, true));   // the first whole
            CHECK(at("so. Amen.\n\n", true) == result(4, true));            // the earlier of two
            CHECK(at("so. Am", true) == result(4, false));    // "Am" may become "Amen"
            CHECK(at("so. Am", false) == result(6, false));   // ... unless nothing follows
            CHECK(at("so. A\n", true) == result(5, false));   // "\n" may become "\n\n"
            CHECK(at("so. Ax", true) == result(6, false));    // "Ax" cannot
            CHECK(at("", true) == result(0, false));
            // a whole stop string ends the text at once, though "abcd" began earlier
            const moas::stop_match held = moas::find_stop("abc", {"abcd", "c"});
            CHECK(held.end == 2 && held.found);
            const moas::stop_match last = moas::find_stop("abc", {"abcd", "c"}, false);
            CHECK(last.end == 2 && last.found);
            const moas::stop_match no_stops = moas::find_stop("abc", {});
            CHECK(no_stops.end == 3 && !no_stops.found);
            CHECK(status_of([] { moas::find_stop("abc", {std::string("a\0b", 3)}); }) ==
                  MOAS_ERR_INVALID_ARG);

            // a generation loop: show what cannot be a stop string yet, one piece at a time
            const auto stream = [&](const std::vector<std::string> &pieces) {
                std::string shown, pending;
                for (size_t i = 0; i < pieces.size(); i++) {
                    pending += pieces[i];
                    const moas::stop_match m =
                        moas::find_stop(pending, stops, i + 1 < pieces.size());
                    shown += pending.substr(0, m.end);
                    if (m.found) {
                        return shown;
                    }
                    pending.erase(0, m.end);
                }
                return shown + "|" + pending;   // "|": not stopped; what was left over
            };
            CHECK(stream({"so.", "\n", "\nAnd"}) == "so.");
            CHECK(stream({"so. A", "men"}) == "so. ");
            CHECK(stream({"so. A", "\n", "x"}) == "so. A\nx|");
            CHECK(stream({"so. A", "m"}) == "so. Am|");
        }
    } catch (const moas::error &e) {
        std::fprintf(stderr, "test_cpp_wrapper: %s\n", e.what());
        return 1;
    }
    if (failures == 0) {
        std::printf("cpp wrapper: ok (lifetimes kept, sizes checked, every token's logits, "
                    "moved-from objects, route and abort callbacks, routing accessors, "
                    "stop strings)\n");
    }
    return failures == 0 ? 0 : 1;
}
