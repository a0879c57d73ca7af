"""A mixture of experts kept fresh by the real daemon on the local Hub: every expert and the base are watched; an
expert's update recomputes only the output shards holding its tensors, the router only when the base or the prompts
change; the gate and the card treat the experts as the parents."""

import json
import signal
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save_file

from mergebot.daemon.state import State
from mergebot.runrecord import Outcome
from tests.test_daemon import TOKEN, Setup, wait_for

PROMPTS = {"ft1": "the garden grows green plants", "ft2": "rain falls from dark clouds over the hedge"}
MLP_TO_EXPERTS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
"""A dense MLP weight → the fused experts tensor of its layer that holds it (mergekit-moe 0.1.5's Mixtral layout)."""


@pytest.fixture
def setup(devhub, tmp_path):
    created = Setup(devhub, tmp_path)
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


def write_moe(setup: Setup, negative: str = "") -> None:
    experts = "".join(
        f'  - source_model: org/{name}\n    positive_prompts: ["{prompt}"]\n'
        + (f'    negative_prompts: ["{negative}"]\n' if negative else "")
        for name, prompt in PROMPTS.items()
    )
    (setup.root / "moe.yml").write_text(
        f"base_model: org/base\ngate_mode: hidden\nout_shard_size: 40KB\nexperts:\n{experts}"
    )


def finished_runs(setup: Setup) -> list:
    """The MoE target's finished runs, oldest first."""
    if not (setup.root / "state" / "state.sqlite3").exists():
        return []
    with State.open(setup.root / "state", readonly=True) as state:
        return [run for run in state.runs("moe")[::-1] if run.outcome != "running"]


def next_run(setup: Setup, count: int):
    """The run after the first `count` finished ones, once it has finished and published."""
    runs = wait_for(lambda: finished_runs(setup)[count:], what=f"run {count + 1} of the MoE target")
    assert runs[0].outcome == Outcome.PUBLISHED, runs[0].reason
    return runs[0]


def change_file_holding(setup: Setup, name: str, tensor: str) -> set[str]:
    """Scale (by 1.02) the upstream file of `name` that holds `tensor`, push it; the tensors in that file."""
    index = json.loads((setup.local / name / "model.safetensors.index.json").read_text())
    shard = setup.local / name / index["weight_map"][tensor]
    tensors = load_file(shard)
    save_file({k: v * 1.02 for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    setup.push(name, f"change {shard.name}")
    return set(tensors)


def output_index(setup: Setup) -> dict[str, str]:
    path = hf_hub_download("me/moe", "model.safetensors.index.json", endpoint=setup.devhub.url, token=TOKEN)
    return json.loads(Path(path).read_text())["weight_map"]


def test_an_expert_update_recomputes_only_its_shards_and_the_router_follows_base_and_prompts(setup):
    write_moe(setup)
    setup.write_config('\n[[targets]]\nname = "moe"\nrepo = "me/moe"\nmergekit_config = "moe.yml"\n')
    setup.start()
    first = next_run(setup, 0)
    index = output_index(setup)
    routers = {index[name] for name in index if name.endswith(".mlp.gate.weight")}
    assert routers and set(first.record.computed) == set(index.values())
    card = setup.card("me/moe")
    assert set(card.data.base_model) == {"org/base", "org/ft1", "org/ft2"}
    for name, prompt in PROMPTS.items():
        sha = first.inputs[f"org/{name}"]
        assert f"| org/{name} | `{sha}` | &quot;{prompt}&quot; |" in card.text
    assert {p for p in first.record.figures["parent_ppl"]} == {"org/base", "org/ft1", "org/ft2"}

    # One expert's update: the shards holding its MLP tensors of the layers in the changed file, nothing else.
    changed = change_file_holding(setup, "ft1", "model.layers.1.mlp.up_proj.weight")
    second = next_run(setup, 1)
    expected = set()
    for tensor in changed:
        layer, _, kind = tensor.removeprefix("model.layers.").partition(".mlp.")
        if kind.removesuffix(".weight") in MLP_TO_EXPERTS:
            expected.add(index[f"model.layers.{layer}.mlp.experts.{MLP_TO_EXPERTS[kind.removesuffix('.weight')]}"])
    assert expected and expected < set(index.values()) and set(second.record.computed) == expected
    assert not routers & expected
    assert second.inputs["org/ft1"] != first.inputs["org/ft1"]
    assert second.inputs["org/ft2"] == first.inputs["org/ft2"]

    # New prompts: only the router is recomputed.
    write_moe(setup, negative="cold winter snow")
    setup.process.send_signal(signal.SIGHUP)
    third = next_run(setup, 2)
    assert set(third.record.computed) == routers
    assert "&quot;cold winter snow&quot;" in setup.card("me/moe").text

    # The base's update: the hidden router runs the base, so it is recomputed with the base's own tensors.
    changed = change_file_holding(setup, "base", "model.layers.0.self_attn.q_proj.weight")
    fourth = next_run(setup, 3)
    from_base = {index[name] for name in changed if name in index}
    assert from_base and set(fourth.record.computed) == from_base | routers
    assert setup.stop() == 0
