"""``largelm-generate`` end to end: the module entry point in a subprocess on small checkpoints the test makes (a
consolidated directory and a quantized one from a tiny GPT with large random weights; a real 2-rank TP=2 training
checkpoint for the slow test), interactive mode through stdin, and the errors (BERT, missing directory, bad flags).
The text printed must be what in-process generation (largelm/model/generate.py) gives for the same model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from mp_utils import randomize
from train_utils import REPO, check_ok, launch, tiny_config

from largelm.checkpoint.consolidated import Consolidated, save_consolidated, strip_vocab_padding
from largelm.config import BertConfig, ModelConfig, ParallelConfig, config_from_dict
from largelm.generation.cli import main
from largelm.model.bert import build_bert_model
from largelm.model.generate import generate_ids
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.quant import QuantFormat, build_model, load_quantized, quantize_model, save_quantized
from largelm.tokenizer import Tokenizer

SPEED = re.compile(r"\[(\d+) new tokens in [0-9.]+ s: [0-9.]+ tokens/s, (KV cache|no cache)\]")
PROMPTS = ["To be, or not to be", "What light through yonder"]


def _consolidated(model, model_cfg, cfg, tokenizer, vocab, bert=None) -> Consolidated:
    full = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tensors, padding = strip_vocab_padding(full, vocab)
    return Consolidated(tensors, model_cfg, cfg, padding, 1, {"kind": "test"}, tokenizer, bert=bert)


def expected_text(model, tok, prompt: str, new: int, context: int, **kw) -> str:
    ids = tok.encode(prompt)
    out = generate_ids(model, ids, new, context=context, vocab_size=tok.vocab_size, eos_id=tok.eos_id, **kw)
    return tok.decode(out)


@pytest.fixture(scope="module")
def made(tp1, tokenizer_path, shard_dir, shard_seq_length, tmp_path_factory):
    """Directories largelm-generate reads, and the in-process model / tokenizer / config behind them."""
    tmp = tmp_path_factory.mktemp("generate")
    tok = Tokenizer.load(tokenizer_path)
    raw = yaml.safe_load(tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length).read_text())
    raw["model"]["vocab_size"] = tok.vocab_size
    cfg = config_from_dict(raw)
    model_parallel_manual_seed(0)
    model = randomize(build_model(cfg), 0).eval()
    save_consolidated(tmp / "hub", _consolidated(model, cfg.model, cfg, tokenizer_path, tok.vocab_size))
    qmodel = randomize(build_model(cfg), 0).eval()
    quantize_model(qmodel, QuantFormat(8), "rtn")
    save_quantized(qmodel, cfg, tmp / "int8", method="rtn", fmt=QuantFormat(8))
    bert_cfg = ModelConfig(arch="bert", style="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4,
                           seq_length=32, vocab_size=tok.vocab_size, make_vocab_size_divisible_by=64)
    bert = build_bert_model(bert_cfg, ParallelConfig(), BertConfig(), vocab_size=tok.vocab_size)
    save_consolidated(tmp / "bert", _consolidated(bert, bert_cfg, None, tokenizer_path, tok.vocab_size, BertConfig()))
    return {"tmp": tmp, "model": model, "tok": tok, "cfg": cfg}


def run_cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "largelm.generation.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_prompt_prints_the_generation_and_its_speed(made):
    proc = run_cli("--checkpoint", made["tmp"] / "hub", "--prompt", PROMPTS[0], "--max-new-tokens", 12)
    assert proc.returncode == 0, proc.stderr
    expected = expected_text(made["model"], made["tok"], PROMPTS[0], 12, made["cfg"].model.seq_length)
    assert proc.stdout == expected + "\n"
    speed = SPEED.search(proc.stderr)
    assert speed and speed.group(2) == "KV cache" and 1 <= int(speed.group(1)) <= 12, proc.stderr


@pytest.mark.slow
def test_interactive_reads_prompts_until_eof(made):
    """Sampled, without the cache (the same tokens as in-process sampling with the cache), from a quantized
    checkpoint too."""
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, seed=5)
    proc = run_cli("--checkpoint", made["tmp"] / "hub", "--interactive", "--max-new-tokens", 10, "--no-cache",
                   "--temperature", 0.9, "--top-k", 40, "--top-p", 0.9, "--seed", 5, stdin="\n".join(PROMPTS) + "\n")
    assert proc.returncode == 0, proc.stderr
    context = made["cfg"].model.seq_length
    assert proc.stdout.splitlines() == [expected_text(made["model"], made["tok"], p, 10, context, **kw)
                                        for p in PROMPTS]
    assert [m.group(2) for m in SPEED.finditer(proc.stderr)] == ["no cache", "no cache"]
    quant = run_cli("--checkpoint", made["tmp"] / "int8", "--interactive", "--max-new-tokens", 4, stdin=PROMPTS[1])
    assert quant.returncode == 0 and quant.stdout.startswith(PROMPTS[1][:4]), quant.stderr
    assert "quantized checkpoint" in quant.stderr


def test_errors_name_what_is_wrong(made, capsys):
    """In-process (``main``): a BERT checkpoint, a missing directory, a tokenizer that does not fit; bad flags are
    usage errors (exit 2) before anything is loaded."""
    assert main(["--checkpoint", str(made["tmp"] / "bert"), "--prompt", "x"]) == 2
    assert "model.arch='bert'" in capsys.readouterr().err
    assert main(["--checkpoint", str(made["tmp"] / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(made["tmp"] / "hub"), "--prompt", "x",
                 "--tokenizer", str(made["tmp"] / "none.model")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    for flags, message in ((["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
                           (["--temperature", "-1"], "--temperature: must be >= 0"),
                           (["--top-k", "0"], "--top-k: must be >= 1"),
                           (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
                           (["--interactive"], "not allowed with argument --prompt")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(made["tmp"] / "hub"), "--prompt", "x", *flags])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(made["tmp"] / "hub")])  # neither --prompt nor --interactive
    assert "one of the arguments --prompt --interactive is required" in capsys.readouterr().err


def test_prompt_in_process_equals_generate(made, capsys):
    assert main(["--checkpoint", str(made["tmp"] / "hub"), "--prompt", PROMPTS[1], "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == expected_text(made["model"], made["tok"], PROMPTS[1], 6, made["cfg"].model.seq_length) + "\n"
    assert "consolidated model" in out.err and SPEED.search(out.err)


def test_one_loader_serves_lm_eval_too_quantized_checkpoints_included(made):
    """largelm-eval's lm-eval model (``largelm``) opens checkpoints with the generation loader: a quantized one
    scores as the quantization library's own loader gives it (other tensors are stored in bf16, so not exactly the
    in-process model), a consolidated one as the in-process model; kind, path and step say what was loaded."""
    from lm_eval.api.instance import Instance

    from largelm.evaluate.model import LargelmCheckpointLM
    from largelm.model.harness import LargelmLM

    tok, seq = made["tok"], made["cfg"].model.seq_length
    pairs = [("To be, or not to be:", " that is the question"), ("O", " villain, villain, smiling!")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(pairs)]
    quantized = load_quantized(made["tmp"] / "int8")[0]
    for name, model, kind, step in (("int8", quantized, "quantized", None), ("hub", made["model"], "consolidated", 1)):
        lm = LargelmCheckpointLM(checkpoint=str(made["tmp"] / name), batch_size=2)
        assert (lm.loaded.kind, lm.loaded.path, lm.loaded.step) == (kind, made["tmp"] / name, step)
        assert lm.loglikelihood(requests) == LargelmLM(model, tok, max_length=seq).loglikelihood(requests)


@pytest.mark.slow
def test_generation_on_two_tensor_parallel_ranks_takes_the_tp1_models_greedy_path(made):
    """``--nproc 2``: two spawned ranks with half the weights each generate what the TP=1 model generates greedily.
    The two layouts' logits differ by at most ``logit_tol`` (fp32 summation order), so every step whose TP=1 top-2
    margin exceeds twice that picks the same token; the text is compared up to the first closer step (none, with
    these large random weights, unless the model changes)."""
    import torch
    from tolerances import logit_tol

    model, tok, cfg = made["model"], made["tok"], made["cfg"]
    new = 8
    proc = run_cli("--checkpoint", made["tmp"] / "hub", "--prompt", PROMPTS[0], "--max-new-tokens", new,
                   "--nproc", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 tensor-parallel ranks" in proc.stderr and SPEED.search(proc.stderr).group(2) == "KV cache"
    ids = tok.encode(PROMPTS[0])
    path = generate_ids(model, ids, new, context=cfg.model.seq_length, vocab_size=tok.vocab_size,
                        eos_id=tok.eos_id, use_cache=False)
    with torch.no_grad():
        logits = model(torch.tensor([path]), torch.arange(len(path)).unsqueeze(0), None)[0, :, :tok.vocab_size]
    tol = logit_tol(cfg.model, float(logits.abs().max()))
    top2 = logits[len(ids) - 1:len(path) - 1].topk(2, dim=-1).values
    close = [i for i, (a, b) in enumerate(top2.tolist()) if a - b <= 2 * tol]
    sure = len(ids) + (close[0] if close else new)
    assert proc.stdout.startswith(tok.decode(path[:sure]))
    if not close:
        assert proc.stdout == tok.decode(path) + "\n"
    bad = run_cli("--checkpoint", made["tmp"] / "hub", "--interactive", "--nproc", 2)
    assert bad.returncode == 2 and "--nproc" in bad.stderr


@pytest.mark.slow
def test_training_checkpoint_of_a_tensor_parallel_run(tp1, tokenizer_path, shard_dir, shard_seq_length, tmp_path):
    """A real 2-rank TP=2 launcher checkpoint (llama style) generates on one process (consolidated on load): the
    command's greedy text (cache) is the in-process no-cache generation from the same checkpoint."""
    from largelm.generation.load import load_causal_lm

    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         model={"style": "llama", "num_query_groups": 2, "tie_embeddings": False},
                         parallel={"tensor_parallel": 2, "zero_stage": 1},
                         train={"steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "eval_interval": 0,
                                "log_interval": 1},
                         checkpoint={"dir": str(tmp_path / "ckpt"), "save_interval": 2, "keep_last": 1})
    check_ok(launch(config, nproc=2))
    proc = run_cli("--checkpoint", tmp_path / "ckpt", "--prompt", PROMPTS[0], "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert "TP=2 PP=1 DP=1" in proc.stderr
    loaded = load_causal_lm(tmp_path / "ckpt")
    assert proc.stdout == expected_text(loaded.module, loaded.tokenizer, PROMPTS[0], 8, loaded.context,
                                        use_cache=False) + "\n"


@pytest.mark.slow
def test_serve_answers_openai_completions_over_http(made, tmp_path):
    """largelm-serve on loopback (a free port), queried with a real HTTP client (requests): a batch of two prompts
    (greedy) answers the in-process generation; a bad field is a 400 naming it; /v1/models lists the model."""
    import time

    import requests

    from largelm.generation.serve import continuation

    log = tmp_path / "serve.log"
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "largelm.generation.serve", "--checkpoint",
                                 str(made["tmp"] / "hub"), "--port", "0", "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+)/v1/completions", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        base = found.group(1)
        answer = requests.post(f"{base}/v1/completions", timeout=120,
                               json={"prompt": PROMPTS, "max_tokens": 6, "temperature": 0})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        tok, context = made["tok"], made["cfg"].model.seq_length
        expected = []
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            new = generate_ids(made["model"], ids, 6, context=context, vocab_size=tok.vocab_size,
                               eos_id=tok.eos_id)[len(ids):]
            expected.append(continuation(tok, ids, new[:-1] if new[-1] == tok.eos_id else new))
        assert body["object"] == "text_completion"
        assert [c["text"] for c in body["choices"]] == expected
        assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in PROMPTS)
        bad = requests.post(f"{base}/v1/completions", json={"prompt": "x", "temperature": -1}, timeout=60)
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
        assert requests.get(f"{base}/v1/models", timeout=60).json()["data"][0]["context_length"] == context
    finally:
        proc.terminate()
        proc.wait(timeout=60)
