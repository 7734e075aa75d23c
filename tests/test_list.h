/* Every test, one per line, grouped by file. run_tests.c expands this list twice. */

/* tests/test_core.c */
X(version_macros_match_runtime)
X(status_strings_cover_every_status)
X(params_init_sets_size_and_defaults)
X(params_init_never_writes_past_the_callers_size)

/* tests/test_gguf.c */
X(gguf_reads_every_value_type)
X(gguf_lookups_find_and_miss)
X(gguf_type_sizes_and_names)
X(gguf_accepts_minimal_files)
X(gguf_parses_tiny_model)
X(gguf_tiny_model_is_deterministic)
X(gguf_rejects_malformed_files)
X(gguf_malformed_cases_start_from_valid_files)
X(gguf_rejects_every_truncation)
X(gguf_rejects_every_truncation_of_every_value_type)
X(gguf_alignment_variants_agree)
X(gguf_round_trips_random_files)
X(gguf_directory_is_one_allocation)
X(gguf_many_entries_are_checked_by_sorting)

/* tests/test_model.c */
X(model_path_and_buffer_loads_agree)
X(model_misaligned_buffer_is_copied)
X(model_metadata_getters_read_typed_values)
X(model_refuses_missing_or_misshapen_tensors)
X(model_refuses_bad_hyperparameters)
X(model_refuses_unsupported_weight_types)
X(model_refuses_every_truncation)
X(model_load_errors_name_the_cause)
X(model_shared_by_interleaved_contexts)

/* tests/test_ops.c */
X(f16_to_f32_exact_cases)
X(f32_to_f16_rounds_to_nearest_even)
X(f16_round_trip_is_exact_for_all_values)
X(ref_dot_q8_0_hand_computed)
X(ref_dot_and_axpy_hand_computed)

/* tests/test_kernels.c */
X(kernels_tables_are_complete)
X(kernels_select_ref_or_fastest_runnable)
X(kernels_ref_dot_f32_matches_ref)
X(kernels_ref_dot_f16_matches_ref)
X(kernels_ref_dot_q8_0_matches_ref)
X(kernels_ref_matmul_matches_ref_and_tiles_agree)
X(kernels_ref_attention_softmax_gelu_match_ref)
X(kernels_ref_axpy_f32_matches_ref)
X(kernels_ref_axpy_f16_matches_ref)
X(kernels_ref_special_values)
X(kernels_avx2_dot_f32_matches_ref)
X(kernels_avx2_dot_f16_matches_ref)
X(kernels_avx2_dot_q8_0_matches_ref)
X(kernels_avx2_matmul_matches_ref_and_tiles_agree)
X(kernels_avx2_attention_softmax_gelu_match_ref)
X(kernels_avx2_axpy_f32_matches_ref)
X(kernels_avx2_axpy_f16_matches_ref)
X(kernels_avx2_special_values)
X(kernels_avx512_dot_f32_matches_ref)
X(kernels_avx512_dot_f16_matches_ref)
X(kernels_avx512_dot_q8_0_matches_ref)
X(kernels_avx512_matmul_matches_ref_and_tiles_agree)
X(kernels_avx512_attention_softmax_gelu_match_ref)
X(kernels_avx512_axpy_f32_matches_ref)
X(kernels_avx512_axpy_f16_matches_ref)
X(kernels_avx512_special_values)

/* tests/test_forward.c */
X(golden_baseline_bias_matches_pytorch)
X(golden_baseline_nobias_matches_pytorch)
X(golden_static_bias_matches_pytorch)
X(golden_static_nobias_matches_pytorch)
X(golden_moas_bias_matches_pytorch)
X(golden_moas_nobias_matches_pytorch)
X(golden_moas_f16_weights_match_pytorch)
X(golden_pooled_bias_mixture_matches_pytorch)
X(golden_pooled_nobias_mixture_matches_pytorch)
X(golden_pooled_bias_routed_matches_pytorch)
X(golden_pooled_nobias_routed_matches_pytorch)
X(incremental_decode_equals_recompute)
X(truncate_then_redecode_equals_uninterrupted_run)
X(logits_identical_for_any_thread_count)
X(decode_errors_leave_context_unchanged)
X(context_params_are_checked)
X(mixture_kv_bytes_follow_formula)
X(f16_kv_cache_close_to_f32)

/* tests/test_routing.c */
X(routed_kv_bytes_follow_formula_for_random_routing)
X(pooled_kv_bytes_follow_formula)
X(routed_forced_mha_equals_mha_branch_alone)
X(routed_force_and_callback_take_effect)
X(routed_kv_budget_holds)
X(routed_batch_and_truncate_equal_uninterrupted)
X(routed_f16_cache_close_to_f32)

/* tests/test_tokenizer.c */
X(tokenize_follows_sorted_vocabulary)
X(tokenize_names_unknown_character_and_offset)
X(tokenize_reports_needed_size)

/* tests/test_sampler.c */
X(sampler_greedy_picks_argmax_and_skips_nan)
X(sampler_temperature_matches_softmax)
X(sampler_top_k_and_top_p_cut_the_tail)
X(sampler_same_seed_same_tokens)
X(sampler_params_are_checked)
X(sampler_top_k_keeps_the_k_most_likely)

/* tests/test_alloc.c */
X(decode_allocates_nothing_and_free_releases_everything)
X(allocation_failures_at_creation_are_clean)

/* tests/test_concurrency.c */
X(concurrency_shared_model_matches_sequential)
X(concurrency_last_error_is_per_thread)

/* tests/test_bad_inputs.c */
X(bad_inputs_hyperparameters_out_of_range_or_mistyped)
X(bad_inputs_unknown_tokenizer_or_mixing_is_unsupported)
X(bad_inputs_sampler_params_size_is_checked)
