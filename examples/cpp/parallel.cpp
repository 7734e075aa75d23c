/*
 * parallel.cpp - several continuations of one prompt, sampled together: the prompt is
 * decoded once, forked (the forks share its KV pages), and every step advances all the
 * forks in one batched call of the pool.
 *
 *     c++ -std=c++17 parallel.cpp $(pkg-config --cflags --libs moas) -o parallel
 *     ./parallel models/pooled-kjv-kvinit.gguf "And God said" [n_forks] [n_chars]
 *
 * Prints each continuation, then checks that the last one equals the same characters
 * decoded by a context of its own, and that its saved state, loaded into another
 * context, decodes on to the same logits (exit status 1 if not): batching, forking
 * and saving change no number. Then, on a model with pooled K/V, compacts the prompt's
 * context to its cheapest scheme (the exact count and bytes; the forks untouched),
 * and shifts it by one position (RoPE models; others refuse and change nothing).
 */
#include "moas.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

/* See main: returns 0, or 1 after saying what went wrong. */
static int compact_prompt(const moas::model &model, moas::context &first,
                          std::vector<moas::context> &forks) {
    int32_t cheapest = 0;
    for (int32_t s = 1; s < model.n_scheme(); s++) {
        if (first.kv_token_bytes(s) < first.kv_token_bytes(cheapest)) {
            cheapest = s;
        }
    }
    const std::vector<int32_t> counts = first.scheme_counts();
    const int32_t token_layers = first.n_past() * model.n_layer();
    const std::vector<unsigned char> fork_before =
        !forks.empty() ? forks.front().save_state() : std::vector<unsigned char>();
    const int32_t changed = first.compact(first.n_past(), cheapest);
    if (changed != token_layers - counts[static_cast<size_t>(cheapest)] ||
        first.kv_bytes_used() !=
            static_cast<size_t>(first.n_past()) * first.kv_token_bytes(cheapest) ||
        (!forks.empty() && forks.front().save_state() != fork_before)) {
        std::fprintf(stderr, "error: compaction changed %d token-layers, or the wrong "
                     "bytes, or a fork\n", changed);
        return 1;
    }
    std::fprintf(stderr, "compacted the prompt's %d token-layers to scheme %d: %d changed, "
                 "%zu bytes used\n", token_layers, cheapest, changed, first.kv_bytes_used());
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL [PROMPT] [N_FORKS] [N]\n", argv[0]);
        return 2;
    }
    const std::string prompt = argc > 2 ? argv[2] : "And God";
    const int n_forks = argc > 3 ? std::atoi(argv[3]) : 4;
    const int n = argc > 4 ? std::atoi(argv[4]) : 20;
    if (prompt.empty() || n_forks < 1 || n < 0) {
        std::fprintf(stderr, "%s: the prompt must not be empty, N_FORKS >= 1, N >= 0\n",
                     argv[0]);
        return 2;
    }
    try {
        moas::model model(argv[1]);
        moas_pool_params pp;
        moas_pool_params_init(&pp);
        pp.capacity_bytes = 16u << 20;
        moas::pool pool(model, pp);
        moas::context first(model, pool, MOAS_MODE_ROUTED);
        const std::vector<int32_t> ids = model.tokenize(prompt);
        first.decode(ids);

        std::vector<moas::context> forks;
        std::vector<moas::sampler> samplers;
        std::vector<std::string> texts(static_cast<size_t>(n_forks), prompt);
        std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(n_forks));
        for (int f = 0; f < n_forks; f++) {
            forks.push_back(first.fork());
            moas_sampler_params sp;
            moas_sampler_params_init(&sp);
            sp.temperature = 0.8f;
            sp.seed = static_cast<uint64_t>(f + 1);
            samplers.emplace_back(model.n_vocab(), &sp);
        }
        std::vector<std::vector<int32_t>> next(static_cast<size_t>(n_forks),
                                               std::vector<int32_t>(1));
        for (int i = 0; i < n && first.n_past() + i < first.n_ctx(); i++) {
            std::vector<moas::pool::sequence> step;
            for (int f = 0; f < n_forks; f++) {
                const size_t k = static_cast<size_t>(f);
                next[k][0] = samplers[k].sample(forks[k]);
                texts[k] += model.token_text(next[k][0]);
                chosen[k].push_back(next[k][0]);
                step.push_back({forks[k], next[k]});
            }
            pool.decode(step);
        }
        for (const std::string &t : texts) {
            std::printf("%s\n", t.c_str());
        }
        const moas_pool_info info = pool.stats();
        std::fprintf(stderr, "%d forks hold %d pages of %llu bytes\n", n_forks,
                     info.n_pages - info.pages_free,
                     static_cast<unsigned long long>(info.page_bytes));

        moas_context_params cp;
        moas_context_params_init(&cp);
        cp.mode = MOAS_MODE_ROUTED;
        moas::context alone(model, &cp);
        alone.decode(ids);
        alone.decode(chosen.back());
        if (std::memcmp(alone.logits(), forks.back().logits(),
                        sizeof(float) * static_cast<size_t>(model.n_vocab())) != 0) {
            std::fprintf(stderr, "error: the last fork's logits differ from decoding it alone\n");
            return 1;
        }
        /* the last fork saved and restored outside the pool, if it has room for one more
         * token to compare (sampling stops at a full context) */
        if (forks.back().n_past() < forks.back().n_ctx()) {
            const std::vector<unsigned char> state = forks.back().save_state();
            moas::context restored(model, &cp);
            restored.load_state(state);
            const int32_t token = chosen.back().empty() ? ids.back() : chosen.back().back();
            restored.decode(token);
            forks.back().decode(token);
            if (std::memcmp(restored.logits(), forks.back().logits(),
                            sizeof(float) * static_cast<size_t>(model.n_vocab())) != 0) {
                std::fprintf(stderr, "error: a restored state decodes differently\n");
                return 1;
            }
        }
        /* A pooled model: the prompt's own context, whose pages the forks share,
         * pooled down to its cheapest scheme: every token-layer that stored more heads
         * changes, it then uses exactly n_past tokens of that scheme, and the forks
         * stay as they were. (Independent schemes' K/V cannot be pooled.) */
        if (model.kv_sharing() == MOAS_KV_SHARING_POOLED) {
            if (compact_prompt(model, first, forks) != 0) {
                return 1;
            }
        }
        /* shift: a RoPE model drops position 1 and moves the rest down; one with
         * learned positions refuses (MOAS_ERR_INVALID_ARG) and changes nothing */
        const int32_t n_past = first.n_past();
        bool refused = false;
        try {
            first.shift(1, 1);
        } catch (const moas::error &e) {
            if (e.status() != MOAS_ERR_INVALID_ARG) {
                throw;
            }
            refused = true;
        }
        if (first.n_past() != (refused ? n_past : n_past - 1)) {
            std::fprintf(stderr, "error: shift left %d tokens of %d\n", first.n_past(), n_past);
            return 1;
        }
    } catch (const moas::error &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
