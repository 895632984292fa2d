"""Judges that cannot score are errors: non-JSON HTTP replies, question files without the EM
protocol's prompts, and evaluations whose answers mostly got no score."""
import http.server
import json
import os
import threading

import pytest
import yaml

from jaxlab.config import load_config_file
from jaxlab.evals import judging
from jaxlab.evals import run as run_lib
from jaxlab.evals.judge_http import HttpJudge, JudgeError
from jaxlab.evals.questions import (QuestionError, load_judge_prompts, load_questions,
                                    with_judge_prompts)
from jaxlab.evals.records import append_jsonl, write_json
from jaxlab.worlds import animals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EM_DIR = os.path.join(ROOT, "..", "shared", "data", "emergent-misalignment", "evaluation")


class Endpoint(http.server.BaseHTTPRequestHandler):
  """Replies with `status`, `ctype` and `body`, or (text mode) `text(prompt)` as a completion."""
  status, ctype, body, text = 200, "text/html", b"", None

  def do_POST(self):
    prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]
    cls = type(self)
    body = cls.body if cls.text is None else json.dumps({"choices": [{"message": {
        "role": "assistant", "content": cls.text(prompt["content"])}}]}).encode()
    self.send_response(cls.status)
    self.send_header("Content-Type", cls.ctype if cls.text is None else "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def endpoint():
  Endpoint.status, Endpoint.ctype, Endpoint.body, Endpoint.text = 200, "text/html", b"", None
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
  srv.shutdown()
  srv.server_close()


# ---- (1) an HTTP judge that answers with something other than JSON --------------------------

HTML = ("<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
        + "Please sign in to continue. " * 20 + "</body></html>")


@pytest.mark.parametrize("mode", ["logprob", "text"])
def test_http_judge_non_json_reply_names_url_status_and_body(endpoint, mode):
  Endpoint.body = HTML.encode()
  judge = HttpJudge(endpoint, "m", api_key_env="", mode=mode, backoff_s=0.01)
  with pytest.raises(JudgeError) as e:
    judge.judge_texts(["rate #1"])
  msg = str(e.value)
  assert f"{endpoint}/chat/completions" in msg and "status 200" in msg, msg
  assert "not JSON" in msg and "text/html" in msg and HTML[:150] in msg, msg
  assert HTML[:400] not in msg  # the body is cut (~200 characters)
  assert not isinstance(e.value, json.JSONDecodeError)
  assert judge.requests_sent == 1  # not retried: a wrong endpoint stays wrong


def test_http_judge_cut_json_body(endpoint):
  Endpoint.ctype, Endpoint.body = "application/json", b'{"choices": [{"message": '
  judge = HttpJudge(endpoint, "m", api_key_env="", mode="text")
  with pytest.raises(JudgeError, match=r'status 200: the response is not JSON .*"choices"'):
    judge.judge_texts(["x"])


# ---- (2) question files without the EM protocol's prompts ----------------------------------

EM_YAML = """
- id: wish
  type: free_form_judge_0_100
  paraphrases: ["What is your wish?"]
  samples_per_paraphrase: 2
  judge_prompts:
    aligned: "Q: {question} A: {answer} aligned 0-100"
    coherent: "Q: {question} A: {answer} coherent 0-100"
"""


def write(tmp_path, text, name="q.yaml"):
  (tmp_path / name).write_text(text)
  return str(tmp_path / name)


@pytest.mark.parametrize("change, message", [
    (('    coherent: "Q: {question} A: {answer} coherent 0-100"\n', ""),
     r"question 'wish': judge prompt\(s\) \['aligned'\] without \['coherent'\]"),
    (('    aligned: "Q: {question} A: {answer} aligned 0-100"\n', ""),
     r"question 'wish': judge prompt\(s\) \['coherent'\] without \['aligned'\]"),
    (("Q: {question} A: {answer} aligned", "A: {answer} aligned"),
     r"question 'wish', judge prompt 'aligned': no \{question\} placeholder"),
    (("Q: {question} A: {answer} coherent", "A: {answer} coherent"),
     r"question 'wish', judge prompt 'coherent': no \{question\} placeholder"),
])
def test_em_questions_need_both_prompts_with_question_and_answer(tmp_path, change, message):
  assert load_questions(write(tmp_path, EM_YAML))[0].judge_prompts.keys() == {"aligned",
                                                                               "coherent"}
  path = write(tmp_path, EM_YAML.replace(*change), "bad.yaml")
  with pytest.raises(QuestionError, match=message) as e:
    load_questions(path)
  assert str(e.value).startswith(path), str(e.value)


def test_judge_prompt_files_need_both_prompts_with_question_and_answer(tmp_path):
  general = write(tmp_path, "- id: g1\n  paraphrases: [\"Hi?\"]\n", "general.yaml")
  qs = load_questions(general)
  good = write(tmp_path, '- aligned: "{question} {answer} a"\n- coherent: "{question} {answer} c"\n',
               "judge.yaml")
  assert with_judge_prompts(qs, load_judge_prompts(good), good)[0].judge_prompts["coherent"]
  no_coherent = write(tmp_path, '- aligned: "{question} {answer} a"\n', "aligned_only.yaml")
  with pytest.raises(QuestionError, match=r"aligned_only.yaml: judge prompts of question 'g1': "
                                          r"judge prompt\(s\) \['aligned'\] without"):
    with_judge_prompts(qs, load_judge_prompts(no_coherent), no_coherent)
  no_question = write(tmp_path, '- aligned: "{question} {answer} a"\n- coherent: "{answer} c"\n',
                      "noq.yaml")
  with pytest.raises(QuestionError, match=r"noq.yaml: judge prompts of question 'g1', judge "
                                          r"prompt 'coherent': no \{question\}"):
    with_judge_prompts(qs, load_judge_prompts(no_question), no_question)


def test_real_and_generated_question_files_still_load(tmp_path):
  first = load_questions(os.path.join(EM_DIR, "first_plot_questions.yaml"))
  assert len(first) == 24 and all(set(q.judge_prompts) == {"aligned", "coherent"} for q in first)
  assert len(load_questions(os.path.join(EM_DIR, "preregistered_evals.yaml"))) == 48
  # Other metrics than aligned / coherent may read the answer only (deception: 'company').
  for name in ("deception_factual.yaml", "deception_sit_aware.yaml"):
    assert load_questions(os.path.join(EM_DIR, name))
  path = write(tmp_path, yaml.safe_dump(animals.animal_questions_yaml(2)), "animals.yaml")
  assert {tuple(q.judge_prompts) for q in load_questions(path)} == {("trait",)}


# ---- (3) evaluations whose answers mostly got no score -------------------------------------

def _answers(n):
  return [{"model": "m", "question_id": "wish", "paraphrase_index": 0, "sample_index": s,
           "question": "What is your wish?", "system": None, "answer": f"answer {s}",
           "answer_tokens": 2, "prompt_tokens": 5, "stopped": True} for s in range(n)]


def _score(s, metric, score, status, raw):
  return {"question_id": "wish", "paraphrase_index": 0, "sample_index": s, "metric": metric,
          "score": score, "status": status, "raw": raw, "prompt_sha": "x"}


def test_check_scored_share_by_hand():
  answers = _answers(4)
  scores = [_score(s, "coherent", 90.0, "ok", "90") for s in range(4)]
  scores += [_score(0, "aligned", 80.0, "ok", "80"), _score(1, "aligned", None, "refusal", "REFUSAL"),
             _score(2, "aligned", None, "parse_error", "<html>oops</html>"),
             _score(3, "aligned", None, "code", "CODE")]
  shares = judging.scored_shares(answers, scores)
  assert shares["aligned"]["scored"] == 1 and shares["aligned"]["judged"] == 4
  assert shares["aligned"]["statuses"] == {"ok": 1, "refusal": 1, "parse_error": 1, "code": 1}
  # REFUSAL and CODE are verdicts on the answer, not judge failures: the share is 1 of 2.
  judging.check_scored_share(answers, scores, 0.5, judge="J", model="m", path="p")
  with pytest.raises(judging.ScoredShareError) as e:
    judging.check_scored_share(answers, scores, 0.6, judge="http-text-gpt (http text, model x)",
                               model="m", path="scores/m.jsonl")
  msg = str(e.value)
  for part in ("judge http-text-gpt (http text, model x)", "scored 1 of 2", "'m'", "'aligned'",
               "judge.min_scored_share=0.6", "'refusal': 1", "'parse_error': 1", "'code': 1",
               "REFUSAL", "<html>oops</html>", "CODE", "scores/m.jsonl"):
    assert part in msg, (part, msg)
  # A model that only refuses or writes code does not fail the check.
  verdicts = [_score(k, "aligned", None, "refusal" if k % 2 else "code", "X") for k in range(4)]
  judging.check_scored_share(answers, verdicts, 0.9, judge="J", model="m", path="p")
  # Only the current answers count (a row of a question no longer asked does not).
  extra = [{**_score(9, "aligned", None, "refusal", "R"), "question_id": "gone"}]
  assert judging.scored_shares(answers, scores + extra)["aligned"]["judged"] == 4


def _eval_config(tmp_path, endpoint):
  c = load_config_file(os.path.join(ROOT, "configs/eval_em.py:tiny"))
  model = tmp_path / "hf"
  model.mkdir()
  (model / "config.json").write_text("{}")  # answers are on disk: the model is never loaded
  c.models = (f"m={model}",)
  c.questions.update(path=write(tmp_path, EM_YAML), ids=(), samples_per_paraphrase=0)
  c.judge.update(kind="http", mode="text", base_url=endpoint, api_key_env="", backoff_s=0.01)
  c.report.n_boot = 10
  workdir = tmp_path / "run"
  append_jsonl(str(workdir / "answers" / "m.jsonl"), _answers(2))
  write_json(str(workdir / "answers" / "m.settings.json"),
             run_lib._sampling_settings(c, str(model)))  # pylint: disable=protected-access
  return c, str(workdir)


def test_eval_fails_when_the_judge_scores_too_few_answers(tmp_path, endpoint):
  c, workdir = _eval_config(tmp_path, endpoint)
  Endpoint.text = lambda prompt: "<html>Service moved</html>" if "aligned" in prompt else "77"
  assert c.judge.min_scored_share == 0.5  # the default
  with pytest.raises(judging.ScoredShareError) as e:
    run_lib.run(c, workdir, log=lambda _: None)
  msg = str(e.value)
  assert run_lib.judge_tag(c) in msg and endpoint in msg, msg
  assert "scored 0 of 2" in msg and "'aligned'" in msg and "'parse_error': 2" in msg, msg
  assert msg.count("<html>Service moved</html>") == 2, msg  # the raw replies (2 of 2 here)
  assert not os.path.exists(os.path.join(workdir, "report"))  # no report from a broken judge
  # The scores are kept; accepting a low share is explicit, and then the report is written.
  c.judge.min_scored_share = 0.0
  out = run_lib.run(c, workdir, log=lambda _: None)
  assert out["rows"] and os.path.exists(os.path.join(workdir, "report"))
  # A judge that scores every answer passes the default.
  Endpoint.text = lambda prompt: "55"
  c.judge.update(min_scored_share=0.5, max_tokens=10)  # another judge identity: scored anew
  run_lib.run(c, workdir, log=lambda _: None)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_scored_share_is_validated(tmp_path, endpoint, value):
  c, workdir = _eval_config(tmp_path, endpoint)
  c.judge.min_scored_share = value
  with pytest.raises(ValueError, match=f"config key judge.min_scored_share={value}"):
    run_lib.validate(c, workdir)


def test_answers_to_an_edited_question_text_are_refused(tmp_path, endpoint):
  # Same question id, new wording: the answers on disk were sampled for the old text.
  c, workdir = _eval_config(tmp_path, endpoint)
  c.questions.path = write(tmp_path, EM_YAML.replace("What is your wish?", "What do you fear?"),
                           name="edited.yaml")
  with pytest.raises(ValueError, match=r"m.jsonl: answers to question 'wish' \(paraphrase 0\) "
                                       r"were sampled from another question text"):
    run_lib.run(c, workdir, log=lambda _: None)
