"""lm-evaluation-harness on largelm models: the adapter against direct computations on the model's logits, the
bundled held-out task set, ``largelm-eval`` end to end, parity with lm-eval's own ``hf`` model on the Hugging Face
export of the same weights, the ``eval:`` config rules, and in-training evaluation in tensorboard.

Error model for comparing two fp32 computations of the same log-probabilities that differ only in summation order
(batch padding widths, kernels, megatron vs transformers): a length-K dot product moves by <= K * eps * sum|terms|,
the longest reduction of a layer is its MLP's (ffn_size), so through L layers a logit moves by
<= eps * ffn_size * L * max(1, |logit|); a log-softmax value by at most twice its logits' largest move; a sum over
n tokens by n times that (``logprob_tolerance``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.instance import Instance
from mp_utils import randomize
from train_utils import REPO, check_ok, config_object, launch, tiny_config

from largelm.checkpoint.consolidated import Consolidated, save_consolidated, strip_vocab_padding
from largelm.config import BUNDLED_EVAL_TASKS, EVAL_TASK_TAG, ConfigError, ParallelConfig, config_from_dict
from largelm.convert import verify
from largelm.model.generate import generate_ids
from largelm.model.harness import LargelmLM, flat_metrics, run_harness
from largelm.prepare.eval_tasks import held_out_documents, make_eval_tasks
from largelm.prepare.gpt_data import prepare_data
from largelm.tokenizer import Tokenizer

EPS32 = torch.finfo(torch.float32).eps
SMALL_COUNTS = {"largelm_next_line": 16, "largelm_last_word": 16, "largelm_perplexity": 4, "largelm_next_line_gen": 3}


def logprob_tolerance(model_cfg, max_abs_logit: float, n_tokens: int) -> float:
    return n_tokens * 2 * EPS32 * model_cfg.ffn_size * model_cfg.num_layers * max(1.0, max_abs_logit)


@pytest.fixture(scope="module")
def task_dir(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tasks")
    make_eval_tasks([small_corpus], out, valid_fraction=0.2, counts=SMALL_COUNTS)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_path, shard_dir, shard_seq_length, tp1):
    """(config, fp32 GPTModel with large random weights, tokenizer, consolidated directory of the same weights)."""
    tmp = tmp_path_factory.mktemp("lm_eval_model")
    raw = yaml.safe_load(tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length).read_text())
    tok = Tokenizer.load(tokenizer_path)
    raw["model"].update(vocab_size=tok.vocab_size, ffn_hidden_size=128)
    cfg = config_from_dict(raw)
    model = randomize(verify.build_model(cfg.model, ParallelConfig(), owner=cfg), seed=3).eval()
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    tensors, padding = strip_vocab_padding(tensors, tok.vocab_size)
    save_consolidated(tmp / "model", Consolidated(tensors, cfg.model, cfg, padding, step=0, tokenizer=tokenizer_path))
    return cfg, model, tok, tmp / "model"


def _direct_logprobs(model, tok, ids: list[int]) -> torch.Tensor:
    """One unpadded sequence through the model, log-softmax in float64 over the real vocabulary."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(ids)).unsqueeze(0), None)[0, :, :tok.vocab_size]
    return F.log_softmax(logits.double(), dim=-1), float(logits.abs().max())


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_sum_of_the_continuation_token_logprobs(tiny):
    cfg, model, tok, _ = tiny
    lm = LargelmLM(model, tok, max_length=cfg.model.seq_length, batch_size=3)  # batches of mixed lengths
    pairs = [("To be, or not to be:", " that is the question"), ("Whether 'tis nobler", " in the mind"),
             ("", "Hamlet"), ("O", " villain, villain, smiling, damned villain!"), ("The rest", " is silence.")]
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx = tok.encode(context) if context else [tok.eos_id]
        cont = tok.encode(context + continuation)[len(ctx):] if context else tok.encode(continuation)
        assert len(cont) > 0
        logprobs, max_logit = _direct_logprobs(model, tok, (ctx + cont)[:-1])
        scored = logprobs[-len(cont):]
        expected = float(scored.gather(1, torch.tensor(cont).unsqueeze(1)).sum())
        assert abs(logprob - expected) <= logprob_tolerance(cfg.model, max_logit, len(cont)), (context, logprob,
                                                                                               expected)
        assert greedy == bool((scored.argmax(-1) == torch.tensor(cont)).all())
    # a continuation that is the model's own greedy choice is reported as greedy
    ids = tok.encode("To be, or not")
    best = int(_direct_logprobs(model, tok, ids)[0][-1].argmax())
    text = tok.decode(ids + [best])
    context = tok.decode(ids)
    assert text.startswith(context)
    [(_, greedy)] = lm.loglikelihood(_requests("loglikelihood", [(context, text[len(context):])]))
    assert tok.encode(text)[:len(ids)] != ids or greedy


def test_loglikelihood_rolling_scores_every_token_once(tiny):
    cfg, model, tok, _ = tiny
    seq = cfg.model.seq_length
    lm = LargelmLM(model, tok, max_length=seq, batch_size=2)
    short = "Good night, sweet prince"
    long = " ".join(["And flights of angels sing thee to thy rest!"] * 12)
    ids = tok.encode(long)
    assert len(ids) > 2 * seq  # several windows
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    # short: every token conditioned on EOS and all before it
    s_ids = tok.encode(short)
    logprobs, max_logit = _direct_logprobs(model, tok, [tok.eos_id] + s_ids[:-1])
    expected_short = float(logprobs.gather(1, torch.tensor(s_ids).unsqueeze(1)).sum())
    assert abs(got[0] - expected_short) <= logprob_tolerance(cfg.model, max_logit, len(s_ids))
    # long: token j is predicted once, from the window that ends with it: the first `seq` tokens from EOS + prefix,
    # then each later block of `seq` tokens from the `seq` tokens before each of its tokens' windows
    total, worst, start = 0.0, 0.0, 0
    while start < len(ids):
        end = min(start + seq, len(ids))
        window = ([tok.eos_id] + ids)[max(0, end - seq):end]  # the `seq` inputs that predict ids[end-seq .. end)
        logprobs, max_logit = _direct_logprobs(model, tok, window)
        targets = torch.tensor(ids[max(0, end - seq):end])
        total += float(logprobs.gather(1, targets.unsqueeze(1))[-(end - start):].sum())
        worst = max(worst, max_logit)
        start = end
    assert abs(got[1] - total) <= logprob_tolerance(cfg.model, worst, len(ids))


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(tiny):
    cfg, model, tok, _ = tiny
    lm = LargelmLM(model, tok, max_length=cfg.model.seq_length)
    prompts = ["To be, or not to be", "My lord,"]
    got = lm.generate_until(_requests("generate_until", [(p, {"until": [","], "max_gen_toks": 12}) for p in prompts]))
    for prompt, text in zip(prompts, got):
        ids = tok.encode(prompt)
        out = generate_ids(model, ids, 12, context=cfg.model.seq_length, vocab_size=tok.vocab_size,
                           eos_id=tok.eos_id)
        full = tok.decode([t for t in out[len(ids):] if t != tok.eos_id])
        assert text == full.split(",", 1)[0]
        assert "," not in text


def test_generate_until_stops_as_soon_as_a_stop_string_appears(tiny):
    """Generation ends at the stop string (not after max_gen_toks) and gives the cut of the full generation."""
    cfg, model, tok, _ = tiny
    lm = LargelmLM(model, tok, max_length=cfg.model.seq_length)
    prompt, budget = "To be, or not to be", 24
    ids = tok.encode(prompt)
    full_ids = generate_ids(model, ids, budget, context=cfg.model.seq_length, vocab_size=tok.vocab_size,
                            eos_id=tok.eos_id)[len(ids):]
    assert len(full_ids) == budget and tok.eos_id not in full_ids  # the free run uses the whole budget
    # a stop string that the 3rd generated token completes: the text of tokens 2..3
    stop = tok.decode(full_ids[:3])[len(tok.decode(full_ids[:1])):].strip()
    assert stop and stop not in tok.decode(full_ids[:2])
    full = tok.decode(full_ids)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        [text] = lm.generate_until(_requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": budget})]))
    finally:
        hook.remove()
    assert text == full.split(stop, 1)[0]
    assert len(calls) == 3  # prefill + 2 decode steps: 3 tokens, not 24


def test_adapter_over_a_forward_callable_scores_and_generates_as_over_the_model(tiny):
    """``forward_logprobs`` alone (what in-training evaluation injects): the same log-likelihoods, and greedy
    generation without a cache gives the cached generation's text."""
    cfg, model, tok, _ = tiny
    on_model = LargelmLM(model, tok, max_length=cfg.model.seq_length, batch_size=2)
    on_callable = LargelmLM(None, tok, max_length=cfg.model.seq_length, batch_size=2,
                            forward_logprobs=on_model.forward_logprobs)
    pairs = [("To be, or not to be:", " that is the question"), ("O", " villain!"), ("The rest", " is silence.")]
    assert on_callable.loglikelihood(_requests("loglikelihood", pairs)) == \
        on_model.loglikelihood(_requests("loglikelihood", pairs))
    gen = [(p, {"until": ["\n"], "max_gen_toks": 10}) for p in ("My lord,", "Good night")]
    assert on_callable.generate_until(_requests("generate_until", gen)) == \
        on_model.generate_until(_requests("generate_until", gen))
    with pytest.raises(ValueError, match="a model or a forward_logprobs"):
        LargelmLM(None, tok, max_length=cfg.model.seq_length)


# --- the task set ---------------------------------------------------------------------------------------------

def test_tasks_come_from_the_held_out_split_and_are_reproducible(small_corpus, tokenizer_path, task_dir, tmp_path):
    again = tmp_path / "again"
    make_eval_tasks([small_corpus], again, valid_fraction=0.2, counts=SMALL_COUNTS)
    for name in BUNDLED_EVAL_TASKS:
        assert (again / f"{name}.jsonl").read_bytes() == (task_dir / f"{name}.jsonl").read_bytes()
        config = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        assert config["task"] == name and EVAL_TASK_TAG in config["tag"]
    held_out = held_out_documents([small_corpus], 0.2)
    # exactly the documents prepare_data puts into valid: their token counts agree with its manifest
    manifests = prepare_data([small_corpus], tmp_path / "shards", tokenizer_path, 32, valid_fraction=0.2)
    assert manifests["valid"].num_documents == len(held_out)
    text = "\n".join(held_out)
    rows = [json.loads(line) for line in (task_dir / "largelm_next_line.jsonl").read_text().splitlines()]
    assert len(rows) == SMALL_COUNTS["largelm_next_line"]
    for row in rows:
        assert all(choice in text for choice in row["choices"]) and row["context"].split("\n")[0] in text
        assert len(set(row["choices"])) == len(row["choices"]) == 4


def test_harness_runs_every_bundled_task(tiny, task_dir):
    cfg, model, tok, _ = tiny
    lm = LargelmLM(model, tok, max_length=cfg.model.seq_length, batch_size=4)
    results = run_harness(lm, [EVAL_TASK_TAG], task_dir, limit=3, bootstrap_iters=0)
    metrics = flat_metrics(results)
    for key in ("eval/largelm_next_line/acc", "eval/largelm_next_line/acc_norm", "eval/largelm_last_word/perplexity",
                "eval/largelm_last_word/acc", "eval/largelm_perplexity/word_perplexity",
                "eval/largelm_perplexity/bits_per_byte", "eval/largelm_next_line_gen/exact_match/strip"):
        assert key in metrics, sorted(metrics)
    assert 0 <= metrics["eval/largelm_next_line/acc"] <= 1
    assert metrics["eval/largelm_perplexity/word_perplexity"] > 1
    with pytest.raises(ValueError, match="hellaswag"):
        run_harness(lm, ["hellaswag"], task_dir, limit=1)


# --- parity with lm-eval's hf model on the export -------------------------------------------------------------

@pytest.mark.slow
def test_hf_export_scores_the_same_with_lm_evals_hf_model(tiny, task_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from largelm.convert.api import export_hf

    cfg, model, tok, consolidated = tiny
    export_hf(consolidated, tmp_path / "hf", log=lambda _: None)
    tasks = ["largelm_next_line", "largelm_last_word", "largelm_perplexity"]
    ours = run_harness(LargelmLM(model, tok, max_length=cfg.model.seq_length, batch_size=4), tasks, task_dir,
                       limit=8, log_samples=True, bootstrap_iters=0)
    hf = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=4,
              max_length=cfg.model.seq_length, prefix_token_id=tok.eos_id)
    theirs = run_harness(hf, tasks, task_dir, limit=8, log_samples=True, bootstrap_iters=0)
    seq = cfg.model.seq_length
    for task in tasks:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        close_calls = 0
        for sa, sb in zip(a, b):
            va_all, vb_all, tols = [], [], []
            for args, ra, rb in zip(sa["arguments"], sa["resps"], sb["resps"]):
                va = ra[0][0] if isinstance(ra[0], (list, tuple)) else ra[0]
                vb = rb[0][0] if isinstance(rb[0], (list, tuple)) else rb[0]
                # the bound's inputs: the tokens scored (at most the whole text) and the largest |logit| on them
                text = "".join(str(x) for x in (args.values() if isinstance(args, dict) else args))
                ids = [tok.eos_id] + tok.encode(text)
                max_logit = max(_direct_logprobs(model, tok, ids[i:i + seq])[1] for i in range(0, len(ids), seq))
                tol = logprob_tolerance(cfg.model, max_logit, len(ids))
                assert abs(va - vb) <= tol, (task, sa["doc_id"], va, vb, tol)
                va_all.append(va)
                vb_all.append(vb)
                tols.append(tol)
            if len(va_all) > 1:  # multiple choice: the same answer, unless two choices are closer than the bound
                top = sorted(va_all, reverse=True)
                if top[0] - top[1] > 2 * max(tols):
                    assert va_all.index(top[0]) == vb_all.index(max(vb_all)), (task, sa["doc_id"])
                else:
                    close_calls += 1
        if close_calls == 0 and "acc,none" in ours["results"][task]:
            assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"], task


# --- largelm-eval ---------------------------------------------------------------------------------------------

def _eval_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "largelm.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_largelm_eval_cli_prints_the_table_and_writes_the_json(tiny, task_dir, tmp_path):
    _, _, _, consolidated = tiny
    proc = _eval_cli("--checkpoint", consolidated, "--tasks", "largelm_next_line,largelm_perplexity", "--limit", 4,
                     "--batch-size", 2, "--task-dir", task_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "|largelm_next_line" in proc.stdout and "word_perplexity" in proc.stdout
    out = consolidated.parent / f"{consolidated.name}.lm_eval.json"
    assert f"wrote {out}" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"largelm_next_line", "largelm_perplexity"}
    assert results["largelm"]["kind"] == "consolidated"
    bad = _eval_cli("--checkpoint", consolidated, "--tasks", "no_such_task", "--task-dir", task_dir, "--limit", 1)
    assert bad.returncode == 1 and "no_such_task" in bad.stderr


# --- config ---------------------------------------------------------------------------------------------------

def test_eval_config_refuses_unknown_tasks_and_interleaved_pipelines(task_dir, tmp_path):
    ok = config_object(eval={"tasks": ["largelm_next_line"], "interval": 5, "task_dir": str(tmp_path)})
    assert ok.eval.tasks == ["largelm_next_line"] and ok.eval.limit is None
    with pytest.raises(ValueError, match=r"eval\.tasks: unknown task 'hellaswag'"):
        config_object(eval={"tasks": ["hellaswag"], "interval": 5, "task_dir": str(tmp_path)})
    # a task that a YAML under eval.task_dir defines is known
    (tmp_path / "mine.yaml").write_text("task: my_task\ndataset_path: json\n")
    assert config_object(eval={"tasks": ["my_task"], "interval": 5, "task_dir": str(tmp_path)}).eval.tasks
    section = {"tasks": ["largelm_next_line"], "interval": 5, "task_dir": str(tmp_path)}
    # every layout evaluates (a collective forward where no rank holds the whole model) ...
    for parallel in ({"tensor_parallel": 2}, {"zero_stage": 3}, {"pipeline_parallel": 2, "zero_stage": 1}):
        assert config_object(eval=section, parallel=parallel, model={"num_attention_heads": 4}).eval
    # ... but interleaved pipeline stages are refused, naming the field
    with pytest.raises(ValueError, match="eval: in-training evaluation.*virtual_pipeline"):
        config_object(eval=section, parallel={"pipeline_parallel": 2, "virtual_pipeline": 2, "zero_stage": 1},
                      model={"num_attention_heads": 4, "num_layers": 4})
    assert issubclass(ConfigError, ValueError)


# --- in training ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_in_training_eval_is_logged_to_tensorboard(tmp_path, tokenizer_path, shard_dir, shard_seq_length, task_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         train={"steps": 2, "grad_accum_steps": 1, "eval_interval": 0, "log_interval": 2},
                         eval={"tasks": ["largelm_next_line", "largelm_perplexity"], "interval": 2, "limit": 4,
                               "task_dir": str(task_dir)})
    out = check_ok(launch(config, nproc=2))
    assert "lm-eval at step 2:" in out
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("eval/largelm_next_line/acc", "eval/largelm_perplexity/word_perplexity"):
        assert tag in tags, tags
        assert [e.step for e in events.Scalars(tag)] == [2]


def test_preflight_refuses_a_missing_task_dir(tmp_path, tokenizer_path, shard_dir, shard_seq_length, task_dir):
    from largelm.config import load_config
    from largelm.train.preflight import preflight

    eval_section = {"tasks": ["largelm_next_line"], "interval": 2, "task_dir": str(tmp_path / "none")}
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, eval=eval_section)
    with pytest.raises(ConfigError, match="eval.task_dir=.*does not exist"):
        preflight(load_config(config), 1)
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, eval={**eval_section,
                                                                                      "task_dir": str(task_dir)})
    assert preflight(load_config(config), 1).eval.task_dir == str(task_dir)


def test_registered_as_largelm_in_lm_evals_registry(tiny, task_dir):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from largelm.evaluate.model import LargelmCheckpointLM

    _, _, _, consolidated = tiny
    assert get_model("largelm") is LargelmCheckpointLM
    results = lm_eval.simple_evaluate(model="largelm", model_args=f"checkpoint={consolidated},batch_size=2",
                                      tasks=["largelm_last_word"], limit=3, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    assert 0 <= results["results"]["largelm_last_word"]["acc,none"] <= 1


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_largelm_model(tiny, task_dir):
    _, _, _, consolidated = tiny
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "largelm.evaluate.lm_eval_cli", "--model", "largelm",
                           "--model_args", f"checkpoint={consolidated}", "--batch_size", "2",
                           "--tasks", "largelm_last_word", "--include_path", str(task_dir), "--limit", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "|largelm_last_word" in proc.stdout and "perplexity" in proc.stdout


def test_in_training_eval_leaves_the_training_rngs_as_they_were(tiny, task_dir, tokenizer_path):
    """The harness reseeds Python's, numpy's and torch's RNGs; rank 0 puts them back (exact resume unchanged)."""
    import random

    import numpy as np

    from largelm.train.harness_eval import HarnessEval
    from largelm.train.watchdog import Watchdog

    cfg, model, _, _ = tiny
    run_cfg = config_object(tokenizer={"model": str(tokenizer_path)}, model={"seq_length": cfg.model.seq_length},
                            eval={"tasks": ["largelm_next_line"], "interval": 3, "limit": 2,
                                  "task_dir": str(task_dir)})
    harness = HarnessEval(run_cfg, rank=0)
    assert harness.due(6) and not harness.due(4)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    model.train()
    metrics = harness.run(model, 3, Watchdog(0, hang_timeout_s=None))
    after = (random.random(), np.random.rand(), torch.rand(1))
    assert before == after
    assert model.training  # back in training mode
    model.eval()
    assert set(metrics) >= {"eval/largelm_next_line/acc", "eval/largelm_next_line/acc_norm"}
