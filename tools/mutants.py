"""Break it on purpose: apply one-line mutations to the source, one at a time, and check a test catches each.

    python tools/mutants.py                          # every mutant: a table of which were killed
    python tools/mutants.py ewc_fisher eos_ignored   # only these
    python tools/mutants.py --list                   # the mutants and the tests that must catch them

Each mutant edits a temporary copy of the tree (the files git tracks, and new ones it does not ignore),
never the real files, and runs only the tests that exist to catch it. A mutant is killed when those
tests fail; one that survives is a hole in the suite. The unmutated copy runs the same tests first:
a test that fails before any mutation proves nothing. Not collected by pytest (its name is not test_*).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ST, TR = "tests/test_strategies.py", "tests/test_train.py"

# name: (file, the text as it is, the text as the mutant has it, the tests that must catch it)
MUTANTS = {
    "ewc_fisher": ("strategies.py",
                   "sum((w * (params[n] - self.anchor[n]) ** 2)",
                   "sum(((params[n] - self.anchor[n]) ** 2)",
                   [f"{ST}::test_regulariser_penalty_and_its_gradient"]),
    "ewc_lambda": ("strategies.py",
                   "return getattr(self.cfg, self.strength) * weighted",
                   "return weighted",
                   [f"{ST}::test_regulariser_penalty_and_its_gradient"]),
    "ewc_no_gradient": ("strategies.py",
                        "(params[n] - self.anchor[n]) ** 2",
                        "(params[n].detach() - self.anchor[n]) ** 2",
                        [f"{ST}::test_regulariser_penalty_and_its_gradient"]),
    "mas_lambda": ("strategies.py",
                   'measure, strength = "mas", "mas_lambda"',
                   'measure, strength = "mas", "ewc_lambda"',
                   [f"{ST}::test_regulariser_penalty_and_its_gradient"]),
    "tir_similarity": ("strategies.py",  # every earlier task counted once: EWC
                       "    keep, weights = (1 - similarity[task_id]).tolist(), {}",
                       "    keep, weights = [1.0] * len(per_task), {}",
                       [f"{ST}::test_regulariser_penalty_and_its_gradient"]),
    "similarity_inverted": ("eval.py",
                            "gap += 1 - unit @ unit.T",
                            "gap += 1 + unit @ unit.T",
                            [f"{ST}::test_identical_tasks_are_the_most_similar"]),
    "lwf_T2": ("strategies.py",
               "self.cfg.lwf_alpha * T * T * F.kl_div",
               "self.cfg.lwf_alpha * F.kl_div",
               [f"{ST}::test_lwf_penalty_and_its_gradient"]),
    "lwf_kl_direction": ("strategies.py",
                         "F.kl_div(new, old, log_target=True",
                         "F.kl_div(old, new, log_target=True",
                         [f"{ST}::test_lwf_penalty_and_its_gradient"]),
    "lwf_no_gradient": ("strategies.py",
                        "for x in (teacher, logits[asked][at]))",
                        "for x in (teacher, logits[asked][at].detach()))",
                        [f"{ST}::test_lwf_penalty_and_its_gradient"]),
    "eos_ignored": ("model.py",
                    "            if eos_id is not None:\n",
                    "            if False:\n",
                    ["tests/test_model.py::test_generate_stops_when_every_row_has_ended"]),
    "eos_first_row": ("model.py",
                      "if bool(done.all()):",
                      "if bool(done.any()):",
                      ["tests/test_model.py::test_generate_stops_when_every_row_has_ended"]),
    "no_running_max": ("attention.py",
                       "m_new = torch.maximum(m, S.amax(-1))",
                       "m_new = torch.zeros_like(m)",
                       ["tests/test_attention.py::test_twin_survives_scores_that_overflow_exp"]),
    "causal_mask": ("attention.py",
                    ".tril(diagonal=Tk - Tq)",
                    ".tril(diagonal=Tk - Tq + 1)",
                    ["tests/test_model.py::test_a_future_token_cannot_change_past_logits"]),
    "causal_sdpa": ("attention.py",
                    "F.scaled_dot_product_attention(q, k, v, is_causal=True)",
                    "F.scaled_dot_product_attention(q, k, v, is_causal=False)",
                    ["tests/test_model.py::test_a_future_token_cannot_change_past_logits"]),
    "atomic_in_place": ("data.py",
                        'tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")',
                        "tmp = path",
                        ["tests/test_resume.py::test_atomic_write"]),
    "reservoir_slot": ("llava.py",
                       "torch.randint(self.seen, (1,)",
                       "torch.randint(self.seen + 1, (1,)",
                       [f"{ST}::test_reservoir"]),
    "reservoir_partial_fill": ("llava.py",
                               "torch.randint(self.seen, (1,)",
                               "torch.randint(self.seen - n_fill, (1,)",
                               [f"{ST}::test_reservoir_keeps_each_row_with_probability_k_over_n"]),
    "replay_ratio": ("strategies.py",
                     "round(self.cfg.replay_ratio * len(fresh))",
                     "round(len(fresh) / 4)",
                     [f"{ST}::test_replay_ratio_sets_the_number_of_old_rows"]),
    "fisher_true_labels": ("eval.py",  # the model's own Fisher computed on the true answers again
                           '        if measure == "ewc" and fisher == "model":  # each answer token drawn',
                           '        if False:  # each answer token drawn',
                           [f"{ST}::test_the_models_own_fisher_does_not_vanish_with_the_square_of_the"
                            "_error"]),
    "similarity_uncentred": ("eval.py",  # raw embeddings: their common direction makes tasks alike
                             "    emb = F.embedding(tokens, table - table.mean(0))  # (B, L, d)",
                             "    emb = F.embedding(tokens, table)  # (B, L, d)",
                             [f"{ST}::test_similarity_ignores_a_direction_that_every_token_shares"]),
    "learnt_bwt_all": ("eval.py",  # BWT over every earlier task again, learnt or not
                       "    kept = [j for j in range(len(A) - 1) if A[j][j] >= LEARNT]",
                       "    kept = list(range(len(A) - 1))",
                       ["tests/test_eval.py::test_a_model_that_stops_learning_shows_in_learnt_not_in_bwt",
                        "tests/test_study.py::test_report_files_hold_the_numbers"]),
    "router_mean_key": ("strategies.py",  # one mean instruction key per task, as the router had before
                        "train.subset(range(min(KEYS, len(train))))))",
                        "train.subset(range(min(KEYS, len(train))))).mean(0)[None])",
                        [f"{ST}::test_the_router_finds_every_task_of_the_benchmark_on_held_out_rows"]),
    "expansion_scatter": ("strategies.py",
                          "out[rows, :answer.size(1)] = answer",
                          "out[:int(rows.sum()), :answer.size(1)] = answer",
                          [f"{ST}::test_a_batch_routed_to_several"]),
    "expansion_padding": ("strategies.py",
                          "out = ids.new_full((len(ids), max_new_tokens), eos_id)",
                          "out = ids.new_zeros((len(ids), max_new_tokens))",
                          [f"{ST}::test_a_batch_routed_to_several"]),
    "expansion_one_expert": ("strategies.py",
                             "self.load(model, self.experts[k])",
                             "self.load(model, self.experts[-1])",
                             [f"{ST}::test_a_batch_routed_to_several"]),
    "expansion_expert_aliased": ("strategies.py",
                                 "self.experts.append(copy_params(self.live(model).items()))",
                                 "self.experts.append(dict(self.live(model)))",
                                 [f"{TR}::test_tiny_end_to_end_run"]),
    # each strategy's hook replaced by naive's: the behaviour tests must see the difference
    "replay_hook_naive": ("strategies.py",
                          "        if n_old == 0:\n",
                          "        if True:\n",
                          [f"{ST}::test_replay_keeps_task_0"]),
    "ewc_hook_naive": ("strategies.py",
                       "        if not self.anchor:\n",
                       "        if True:\n",
                       [f"{ST}::test_regularisers_hold_the_parameters_they_protect"]),
    "lwf_hook_naive": ("strategies.py",
                       "        if self.teacher is None:\n",
                       "        if True:\n",
                       [f"{ST}::test_lwf_keeps_task_0_answers_near_the_teacher"]),
    "expansion_hook_naive": ("strategies.py",
                             "        if not self.experts:  # before",
                             "        if True:  # before",
                             [f"{ST}::test_expansion_old_expert_answers_its_task_as_right_after_training"]),
    # runs that survive, and runs that repeat
    "lwf_teacher_unsaved": ("strategies.py",
                            'state = {"teacher": None, "questions": []}',
                            'state = {"questions": []}',
                            ["tests/test_resume.py::test_a_killed_run_of_each_stateful_strategy"]),
    "checkpoint_at_task_end": ("train.py",
                               "(step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps",
                               "(step + 1) % cfg.checkpoint_every == 0 and step + 1 <= steps",
                               ["tests/test_resume.py::test_a_run_killed_in_after_task"]),
    "resume_ignored": ("runner.py",
                       "saved = load_checkpoint(ckpt) if ckpt.is_file() and not cfg.force_new else None",
                       "saved = None",
                       ["tests/test_study.py::test_a_study_killed_mid_run"]),
    "cli_task_file_error": ("train.py",
                            "except (Stop, llava.TaskFileError) as e:",
                            "except Stop as e:",
                            ["tests/test_llava.py::test_every_bad_input_through_the_cli"]),
    "skips_unreported": ("pytest.ini",
                         "addopts = -rs",
                         "addopts =",
                         ["tests/test_layout.py::test_a_green_run_lists"]),
    "base_key_no_threads": ("train.py", "bf16=cfg.bf16, threads=cfg.threads,", "bf16=cfg.bf16,",
                            [f"{TR}::test_threads_default_to_torchs_count_up_to_two_and_key_the_base"]),
    "threads_uncapped": ("runner.py", "cfg.threads or min(2, torch.get_num_threads())",
                         "cfg.threads or torch.get_num_threads()",
                         [f"{TR}::test_threads_default_to_torchs_count_up_to_two_and_key_the_base"]),
    "base_unseeded": ("train.py",
                      "t0, gen = time.time(), torch.Generator().manual_seed(cfg.seed)",
                      "t0, gen = time.time(), torch.Generator().manual_seed(time.time_ns())",
                      [f"{TR}::test_a_cold_cache_trains_the_same_base_again"]),
    "vision_cache_off": ("train.py",
                         "frozen = not cfg.bf16 and not any(",
                         "frozen = False and not any(",
                         [f"{TR}::test_a_frozen_vision_tower_encodes_each_image_once_and_changes_no_weight"]),
    "glyph_font_resized": ("data.py",
                           "    return ImageFont.load_default(size=px)",
                           "    return ImageFont.load_default(size=px + 1)",
                           ["tests/test_data.py::test_the_loaded_once_glyph_font_"
                            "draws_the_pixels_a_fresh_font_draws"]),
    "shared_first_task_not_loaded": ("train.py",
                                     '        model.load_state_dict(shared["model"])',
                                     "        pass",
                                     [f"{TR}::test_a_run_from_naives_first_task_is_the_run_that_trains_it"]),
    "shared_first_task_unchecked": ("runner.py",
                                    '    if saved["config"]["train"]["strategy"] != "naive" or diff:',
                                    "    if False:",
                                    [f"{TR}::test_first_task_from_refuses_what_would_not_give_the_same_"
                                     "bits"]),
    "grounded_colour_blind": ("data.py",  # every grounded caption lists the whole scene: nothing to look up
                              'found = [f"{o.size} {o.shape} {where(o.cell)}" for o in objs '
                              'if o.color in colors]',
                              'found = [f"{o.size} {o.shape} {where(o.cell)}" for o in objs]',
                              ["tests/test_data.py::test_every_answer_matches_an_independent_solver[align]"]),
    "cu_host_typo": ("attention.cu",  # host code, which -cubin leaves to nvcc's front end alone
                     "  auto O = torch::empty_like(q);",
                     "  auto O = torch::empty_like_of(q);",
                     ["tests/test_attention.py::test_attention_cu_compiles_with_nvcc"]),
    "summary_in_finish_order": ("study.py",
                                "for (base, strategy, seed), r in sorted(runs.items(), "
                                "key=lambda kv: kv[0][2]):",
                                "for (base, strategy, seed), r in runs.items():",
                                ["tests/test_study.py::test_summary_lists_each_number_in_seed_order_"
                                 "whatever_order_the_runs_finished_in"]),
    "study_runs_before_base": ("study.py",
                               "                    release(key[1])",
                               "                    pass",
                               ["tests/test_study.py::test_each_seeds_base_is_trained_once_by_a_job_of_its_"
                                "own_before_that_seeds_runs"]),
    "kernel_list_output": ("attention.py",  # what pybind11 makes of attention.cu's std::vector: no gradient
                           "return O, L  # a tuple",
                           "return [O, L]  # a tuple",
                           ["tests/test_attention.py::test_kernels_that_return_lists"]),
    "ddp_unwrapped": ("train.py",
                      "module = DistributedDataParallel(model) if WORLD > 1 else model",
                      "module = model",
                      [f"{TR}::test_two_gloo_processes_train_like_one"]),
    "auto_takes_kernel_untimed": ("attention.py",
                                  'path == "auto" and fits and (q.size(-1), q.dtype) in KERNEL_FASTER',
                                  'path == "auto" and fits',
                                  ["tests/test_attention.py::test_auto_takes_the_kernel_only_where"]),
    "threads_spin": ("train.py",
                     'os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")',
                     'pass',
                     [f"{TR}::test_idle_threads_sleep"]),
    "verdict_no_holm": ("study.py",  # each finding judged at its own p, as if it were the only one
                        '(ev.holm([c[key] for c in checks]) for key in ("p_holds", "p_fails"))',
                        '([c[key] for c in checks] for key in ("p_holds", "p_fails"))',
                        ["tests/test_study.py::test_verdicts_use_holms_correction_across_the_findings"]),
    "finding_min_p": ("study.py",  # a finding of several numbers holds when any one does
                      "p_holds=max(ps) if tested else None,",
                      "p_holds=min(ps) if tested else None,",
                      ["tests/test_study.py::test_verdicts_use_holms_correction_across_the_findings"]),
    "sweep_best_aa_only": ("study.py",  # the best AA wins even where it leaves a task unlearnt
                           'key=lambda v: (found[v]["not learnt"], -found[v]["AA"])',
                           'key=lambda v: -found[v]["AA"]',
                           ["tests/test_study.py::test_the_sweep_picks_by_its_rule"]),
    "config_diff_unread_options": ("runner.py",  # a new EWC default refuses naive's folder again
                                   '    ignore = set(ignore) | set(new.get("strategy", {})) - set(read)\n',
                                   "    ignore = set(ignore)\n",
                                   ["tests/test_runner.py::test_a_changed_option_counts_only_for_a"]),
    "pair_no_restore": ("train.py",  # each later task trains on from the one before it, not from TASK's
                        "        model.load_state_dict(first)",
                        "        pass",
                        [f"{TR}::test_a_task_pair_run_is_naives_run_of_each_pair"]),
    "pair_second_stream": ("train.py",  # the second task draws the first task's batches
                           "        loss = tune(1, model, naive, trains[j]",
                           "        loss = tune(0, model, naive, trains[j]",
                           [f"{TR}::test_a_task_pair_run_is_naives_run_of_each_pair"]),
    "pairs_unlearnt_counted": ("study.py",  # a task never learnt "forgets" nothing: it joins the ranks
                               "None if a == b or alone[a] < LEARNT else",
                               "None if a == b else",
                               ["tests/test_study.py::test_pair_grids_hold_each_learnt_tasks_relative_drop"]),
    "pairs_first_grid_only": ("study.py",  # finding 6 on one base and seed, not their mean
                              "if seed in (None, s) and base in (None, b)]",
                              "if seed in (None, s) and base in (None, b)][:1]",
                              ["tests/test_study.py::test_finding_6_ranks_the_pairs_of_the_mean_grid"]),
    "ranks_ties_off": ("eval.py",  # the sorted ranks lose the middle of a tie: off by a half
                       "    return [below[x] + (equal[x] + 1) / 2 for x in xs]",
                       "    return [below[x] + equal[x] / 2 for x in xs]",
                       ["tests/test_eval.py::test_ranks_sorted_once_are_the_ranks_counted_pair_by_pair"]),
    "mantel_shuffles_cells": ("eval.py",  # pairs taken as independent: a weak ρ of 8 tasks looks clear
                              "        rng.shuffle(order)",
                              "        rng.shuffle(ys)",
                              ["tests/test_eval.py::test_mantels_test_finds_a_strong_correlation"]),
    "compose_inherits_hooks": ("strategies.py",
                               "class Compose:",
                               "class Compose(Strategy):",
                               [f"{ST}::test_compose_passes_a_new_hook"]),
    "base_key_whole_train": ("train.py",
                             "code + inspect.getsource(base_model).encode()",
                             'code + (here / "train.py").read_bytes()',
                             [f"{TR}::test_the_base_key_covers"]),
    "base_key_no_base_code": ("train.py",
                              "code + inspect.getsource(base_model).encode()",
                              "code",
                              [f"{TR}::test_the_base_key_covers"]),
    # a README command that drifted from the code: a flag train.py does not have
    "readme_flag": ("README.md",
                    "python train.py --strategy replay   # the main job",
                    "python train.py --strategy replay --no-such-flag   # the main job",
                    ["tests/test_layout.py::test_every_command_in_the_readme_and_docs_parses"]),
}


def tree_copy(dest):
    """The files git tracks, and untracked ones it does not ignore, as they are now in the working tree."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run_tests(tree, tests, timeout):
    """pytest on these test ids (or id prefixes: every test whose id starts so) -> (exit code, last line)."""
    files = sorted({t.split("::")[0] for t in tests})
    prefixes = [t.split("::")[1] for t in tests if "::" in t]
    select = ["-k", " or ".join(prefixes)] if prefixes and len(prefixes) == len(tests) else []
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files, *select]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    try:
        done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else done.stderr.strip()[-200:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"mutants to run (default: all): {', '.join(MUTANTS)}")
    ap.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    ap.add_argument("--timeout", type=int, default=300, help="seconds for one mutant's tests")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown:
        ap.error(f"unknown mutant(s) {', '.join(unknown)}; choose from {', '.join(MUTANTS)}")
    names = args.names or list(MUTANTS)
    if args.list:  # each mutant and its file, then the tests that must catch it, one a line
        for n in names:
            print(f"{n} ({MUTANTS[n][0]})\n" + "\n".join(f"    {t}" for t in MUTANTS[n][3]))
        return 0
    with tempfile.TemporaryDirectory(prefix="nanocit-mutants-") as tmp:
        tree = Path(tmp)
        tree_copy(tree)
        tests = sorted({t for n in names for t in MUTANTS[n][3]})
        rc, last = run_tests(tree, tests, args.timeout * 2)
        if rc != 0:
            print(f"the unmutated tree fails its tests ({last}): fix that first", file=sys.stderr)
            return 2
        rows, t_all = [], time.time()
        for n in names:
            file, before, after, tests = MUTANTS[n]
            original = (tree / file).read_text()
            if original.count(before) != 1:  # the source moved on: the mutant needs updating, not a verdict
                rows.append((n, file, "STALE", f"{before!r} occurs {original.count(before)} times"))
                continue
            (tree / file).write_text(original.replace(before, after))
            t0 = time.time()
            try:
                rc, last = run_tests(tree, tests, args.timeout)
            finally:
                (tree / file).write_text(original)
            verdict = "killed" if rc == 1 else "SURVIVED" if rc == 0 else f"ERROR (exit {rc})"
            rows.append((n, file, verdict, f"{last} ({time.time() - t0:.0f} s)"))
            print(f"{n}: {verdict}", file=sys.stderr, flush=True)
    width = max(len(n) for n, *_ in rows)
    print(f"{'mutant':{width}}  {'file':14} {'verdict':9} tests")
    for n, file, verdict, detail in rows:
        print(f"{n:{width}}  {file:14} {verdict:9} {detail}")
    killed = sum(v == "killed" for _, _, v, _ in rows)
    print(f"{killed} of {len(rows)} mutants killed in {time.time() - t_all:.0f} s")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
