import pytest

from pernode.serve.sampling.params import SamplingParams


@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", -0.1, ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -2, "-1"),
    ("n", 0, ">= 1"),
    ("max_tokens", 0, ">= 1"),
    ("logprobs", 21, "[0, 20]"),
    ("min_p", 1.5, "[0, 1]"),
    ("presence_penalty", 3.0, "[-2, 2]"),
    ("frequency_penalty", -2.5, "[-2, 2]"),
    ("repetition_penalty", 0.0, "(0, 10]"),
    ("seed", -1, "2**63"),
    ("min_tokens", -1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
])
def test_out_of_range_names_field_value_and_range(field, value, fragment):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"{field}=") and fragment in msg


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=0, temperature=0)
    assert p.stop == ["###"] and p.top_k == -1 and p.greedy


def test_stop_token_ids_are_checked_in_constant_time():
    """The engine thread checks every generated token against the stop ids: a set lookup, not a list scan."""

    from pernode.serve.engine.request import Request
    from pernode.serve.engine.stop_checker import check_stop

    params = SamplingParams(stop_token_ids=list(range(1000, 201_000)), max_tokens=None)
    assert params.stop_token_id_set == frozenset(params.stop_token_ids)
    request = Request("r", [1, 2], params, eos_token_ids=[2])
    request.output_token_ids.append(7)
    request.all_token_ids.append(7)
    assert check_stop(request, max_model_len=10**6) is None
    request.output_token_ids[-1] = 200_999
    assert check_stop(request, max_model_len=10**6) is not None and request.stop_reason == 200_999
    replaced = SamplingParams(stop_token_ids=[3])
    replaced.stop_token_ids = [4]
    replaced.validate()  # a changed list is seen again after validate()
    assert replaced.stop_token_id_set == {4}
