"""docs/contracts.md's batch specs are rendered from jaxpost.algorithms.batch, and the specs are what the code reads."""

from pathlib import Path

import numpy as np

from jaxpost.algorithms import batch as B

DOC = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"
BEGIN, END = "<!-- BEGIN batch specs", "<!-- END batch specs -->"


def test_contracts_doc_batch_specs_equal_the_module():
    text = DOC.read_text()
    block = text[text.index(BEGIN):text.index(END)]
    block = block[block.index("\n") + 1:]
    assert block == B.render_batch_specs(), (
        "docs/contracts.md's batch specs differ from jaxpost/algorithms/batch.py; paste "
        "jaxpost.algorithms.batch.render_batch_specs() between the BEGIN/END markers")


def test_every_spec_key_in_the_doc_with_its_dtype_and_shape():
    text = DOC.read_text()
    for name, spec in B.BATCH_SPECS.items():
        assert f"`{name}`" in text
        for key, dtype in (*spec.items(), *spec.optional.items()):
            assert f"| `{key}` | {np.dtype(dtype).name} | `{spec.shapes[key]}` |" in text


def test_spec_is_a_mapping_of_required_keys_to_dtypes():
    assert dict(B.CACHED_KEYS) == {**B.LM_KEYS, "teacher_topk_logps": np.float32, "teacher_topk_ids": np.int32}
    assert "margin" not in B.PREFERENCE_KEYS and "margin" in B.PREFERENCE_KEYS.optional
    assert B.PACKED_PREFERENCE_KEYS.shapes["pair_mask"] == "[B, K]"
    assert set(B.GRPO_KEYS) == set(B.ROLLOUT_KEYS) | {"advantages"}
    try:
        B.check_batch({"tokens": 0}, B.LM_KEYS, "LM")
    except KeyError as e:
        assert "positions" in str(e) and "loss_mask" in str(e)
    else:
        raise AssertionError("check_batch accepted an incomplete batch")


def test_algorithms_read_the_specs_of_the_one_module():
    from jaxpost.algorithms import online
    from jaxpost.algorithms import distill

    assert online.GRPO_KEYS is B.GRPO_KEYS and online.PPO_KEYS is B.PPO_KEYS
    assert distill.CACHED_KEYS is B.CACHED_KEYS


def test_research_api_example_runs_and_its_comments_are_true():
    import re

    code = re.search(r"## Losses.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    np.testing.assert_allclose(scope["logps"], [3 * np.log(0.5), 2 * np.log(0.5)], rtol=1e-6)
    np.testing.assert_array_equal(scope["lengths"], [3, 2])
    np.testing.assert_allclose(scope["mean"], [np.log(0.5)] * 2, rtol=1e-6)
    got = [float(scope[k][0, 0]) for k in ("pi_c", "pi_r", "len_c", "len_r")]
    assert got == [-3.0, -2.0, 3.0, 2.0]
    assert float(scope["n_tokens"]) == 5.0 and float(scope["jsd"]) > 0
    assert scope["best"].shape == (2, 4)
