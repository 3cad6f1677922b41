"""`pernode serve --speculative`: the OpenAI API over a speculating engine, driven by the `openai` client, and
vLLM's speculative-decoding metrics on /metrics."""
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"), tiny_config())
    options = dict(model=folder, num_blocks=128, max_model_len=256, num_threads=1)
    return LLMEngine(**options), LLMEngine(**options, speculative="ngram,k=4,adaptive=false")


def test_speculating_server_answers_the_same_and_exposes_spec_metrics(engines):
    plain, spec = engines
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"
    texts = []
    for engine in (plain, spec):
        with ServerThread(build_app(engine)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            out = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True})
            texts.append(out.choices[0].text)
            assert out.usage.completion_tokens == 24
            samples = {}
            for family in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
                for s in family.samples:
                    position = s.labels.get("position")
                    samples[s.name + (f"[{position}]" if position else "")] = s.value
    assert texts[0] == texts[1]
    proposed = samples["pernode:spec_decode_num_draft_tokens_total"]
    accepted = samples["pernode:spec_decode_num_accepted_tokens_total"]
    drafts = samples["pernode:spec_decode_num_drafts_total"]
    assert proposed > 0 and 0 < accepted <= proposed and drafts > 0
    assert sum(v for k, v in samples.items() if k.startswith("pernode:spec_decode_num_accepted_tokens_per_pos")) \
        == accepted
    assert samples["pernode:spec_decode_draft_acceptance_rate"] == pytest.approx(accepted / proposed)
    assert samples["pernode:spec_decode_mean_acceptance_length"] == pytest.approx(1 + accepted / drafts)
    # the server counts from when it began serving; the warm-up's generation tokens are not in it
    assert samples["pernode:generation_tokens_total"] >= 24
