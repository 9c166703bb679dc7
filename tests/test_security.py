"""Security properties (issue 7): nothing from a checkpoint, a config or the input can run code,
the metrics endpoint is local by default, and the source keeps to the safe loaders."""

import ast
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from agent.agent import Agent
from agent.config import Config
from agent.daemon import DEFAULT_METRICS_ADDR, parse_addr
from agent.online import persist
from helpers import task_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"arch": "mlp", "hidden": [8]}, "agent": {"in_shape": [1], "out_dim": 1},
          "compute": {"levels": [[1, 1]]}, "memory": {"capacity": 100}, "online": {"every": 2, "replay": 1}}


class Payload:
    """Unpickling this object would create ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def replace_file(ckpt_dir: Path, name: str, data: bytes) -> None:
    """Swap a file *and* fix the manifest, as someone with write access to the state dir could."""
    (ckpt_dir / name).write_bytes(data)
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def one_checkpoint(root: Path) -> Path:
    agent = Agent.from_config(CONFIG)
    for i in range(6):
        agent.handle_line(task_line(i))
    return agent.save(root)


@pytest.mark.parametrize("name", ["meta.pt", "online.pt", "pending.pt"])
def test_checkpoint_tensor_file_with_code_is_refused_without_running_it(tmp_path, name):
    path = one_checkpoint(tmp_path / "state")
    marker = tmp_path / "pwned"
    buf = __import__("io").BytesIO()
    torch.save({"w": Payload(marker)}, buf)
    replace_file(path, name, buf.getvalue())
    with pytest.raises(persist.StateError, match="no usable checkpoint"):
        Agent.load(tmp_path / "state")
    assert not marker.exists()


def test_online_state_with_code_and_forged_tag_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.delenv(persist.ENV_KEY, raising=False)
    path = one_checkpoint(tmp_path / "state")
    marker = tmp_path / "pwned"
    forged = persist.dumps(Payload(marker), key=b"the attacker does not know the key")
    replace_file(path, "online.state", forged)
    with pytest.raises(persist.StateError, match="authentication failed"):
        Agent.load(tmp_path / "state")
    assert not marker.exists()
    # The same payload tagged with the deployment's key would be accepted: the key is the trust root.
    assert persist.loads(persist.dumps([1], key_file=tmp_path / "state" / "state.key"),
                         key_file=tmp_path / "state" / "state.key") == [1]


def test_key_file_created_private_and_refused_when_shared(tmp_path, monkeypatch):
    monkeypatch.delenv(persist.ENV_KEY, raising=False)
    one_checkpoint(tmp_path / "state")
    key = tmp_path / "state" / "state.key"
    assert key.stat().st_mode & 0o777 == 0o600
    for mode in (0o640, 0o604, 0o620):
        os.chmod(key, mode)
        with pytest.raises(persist.StateError, match=f"mode {mode:o}"):
            Agent.load(tmp_path / "state")
    os.chmod(key, 0o600)
    assert Agent.load(tmp_path / "state").counters["tasks"] == 6
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(persist.StateError, match="not a regular file"):
        persist.load_key(tmp_path / "dir.key")


def test_metrics_endpoint_is_loopback_by_default():
    assert parse_addr(DEFAULT_METRICS_ADDR)[0] == "127.0.0.1"
    assert parse_addr(Config().metrics.addr)[0] == "127.0.0.1"
    assert parse_addr("9200") == ("127.0.0.1", 9200) and parse_addr(":9200") == ("127.0.0.1", 9200)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", getattr(f.value, "attr", "")) if isinstance(f, ast.Attribute) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords}


def test_package_uses_only_safe_loaders():
    """Every torch.load passes weights_only=True, np.load allow_pickle=False, YAML is safe_load;
    no eval/exec; pickle is unpickled only in agent/online/persist.py, after the HMAC check."""
    problems = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node, owner, name, kw in _calls(ast.parse(path.read_text(), rel)):
            where = f"{rel}:{node.lineno}"
            const = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value  # noqa: E731
            if owner == "torch" and name == "load" and const("weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and name == "load" and ("allow_pickle" not in kw or const("allow_pickle") is not False):
                problems.append(f"{where}: np.load without allow_pickle=False")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name}")
            if owner == "" and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where}: {name}()")
            if owner in ("pickle", "marshal", "shelve", "dill") and name in ("load", "loads", "Unpickler", "open") \
                    and rel != "agent/online/persist.py":
                problems.append(f"{where}: {owner}.{name}")
    assert not problems, "\n".join(problems)


def test_unpickling_in_persist_happens_only_after_the_tag_check():
    src = (ROOT / "agent" / "online" / "persist.py").read_text()
    body = src[src.index("def loads("):src.index("def save(")]
    assert body.count("pickle.loads(") == 1
    assert body.index("hmac.compare_digest(") < body.index("pickle.loads(")
    assert pickle.loads(pickle.dumps(1)) == 1  # (the module under test is the only user)
