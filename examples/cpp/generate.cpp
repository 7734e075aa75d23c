/*
 * generate.cpp - generate text from a prompt through the RAII wrapper in moas.hpp.
 *
 *     c++ -std=c++17 generate.cpp $(pkg-config --cflags --libs moas) -o generate
 *     ./generate models/moas-kjv.gguf "And God said" [n_chars] [routed]
 *
 * Prints the text to stdout, then the routing and KV bytes to stderr. A library error
 * arrives as a moas::error: its status name and the exact cause, exit status 1.
 */
#include "moas.hpp"

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL [PROMPT] [N] [routed]\n", argv[0]);
        return 2;
    }
    const std::string prompt = argc > 2 ? argv[2] : "In the beginning";
    const int n = argc > 3 ? std::atoi(argv[3]) : 100;
    try {
        moas::model model(argv[1]);
        moas_context_params cp;
        moas_context_params_init(&cp);
        cp.mode = argc > 4 && std::string(argv[4]) == "routed" ? MOAS_MODE_ROUTED
                                                                : MOAS_MODE_MIXTURE;
        moas::context ctx(model, &cp);
        moas_sampler_params sp;
        moas_sampler_params_init(&sp);
        sp.temperature = 0.8f;
        sp.seed = 1;
        moas::sampler sampler(model.n_vocab(), &sp);

        const std::vector<int32_t> ids = model.tokenize(prompt);
        if (ids.empty()) {
            std::fprintf(stderr, "error: the prompt is empty: there is nothing to continue\n");
            return 1;
        }
        ctx.decode(ids);
        std::string text = prompt;
        for (int i = 0; i < n && ctx.n_past() < ctx.n_ctx(); i++) {
            const int32_t token = sampler.sample(ctx);
            text += model.token_text(token);
            ctx.decode(token);
        }
        std::printf("%s\n", text.c_str());

        std::string counts;
        for (int32_t c : ctx.scheme_counts()) {
            counts += (counts.empty() ? "[" : ", ") + std::to_string(c);
        }
        std::fprintf(stderr, "routing: %s] token-layers per scheme, KV bytes %zu\n",
                     counts.c_str(), ctx.kv_bytes_used());
    } catch (const moas::error &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
