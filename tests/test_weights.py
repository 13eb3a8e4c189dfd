import pickle

import pytest
import torch

from dafar.errors import WeightsError
from dafar.train.models import build_dafar
from dafar.train.weights import load_checkpoint, load_into, load_state, save_checkpoint, save_state


def test_safetensors_round_trip(tmp_path):
    net = build_dafar("mnist")
    save_state(tmp_path / "E.safetensors", net.E.state_dict(), {"module": "E"})
    other = build_dafar("mnist")
    load_into(other.E, tmp_path / "E.safetensors")
    for (k, a), (_, b) in zip(net.E.state_dict().items(), other.E.state_dict().items()):
        assert torch.equal(a, b), k


def test_wrong_architecture_is_refused(tmp_path):
    save_state(tmp_path / "E.safetensors", build_dafar("cifar10").E.state_dict())
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_into(build_dafar("mnist").E, tmp_path / "E.safetensors")
    save_state(tmp_path / "F.safetensors", build_dafar("mnist").F.state_dict())
    with pytest.raises(WeightsError, match="missing"):
        load_into(build_dafar("mnist").E, tmp_path / "F.safetensors")


def test_non_finite_weights_are_refused(tmp_path):
    sd = build_dafar("mnist").C.state_dict()
    sd["net.1.weight"][0, 0] = float("nan")
    save_state(tmp_path / "C.safetensors", sd)
    with pytest.raises(WeightsError, match="non-finite"):
        load_into(build_dafar("mnist").C, tmp_path / "C.safetensors")


def test_corrupt_and_truncated_files(tmp_path):
    save_state(tmp_path / "E.safetensors", build_dafar("mnist").E.state_dict())
    raw = (tmp_path / "E.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="t.safetensors"):
        load_state(tmp_path / "t.safetensors")
    with pytest.raises(WeightsError, match="missing"):
        load_state(tmp_path / "none.safetensors")


class _Payload:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_a_pickle_is_never_unpickled(tmp_path):
    _Payload.marker = str(tmp_path / "executed")
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(WeightsError):
        load_state(tmp_path / "evil.safetensors")
    assert not (tmp_path / "executed").exists()


def test_checkpoint_round_trip_restores_optimizer_and_schedule(tmp_path):
    torch.manual_seed(0)
    net = build_dafar("mnist", with_detector=False)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=10)
    x = torch.rand(2, 1, 28, 28)
    net(x)[0].sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path / "ck", net, opt, sched, {"epochs_done": 1})
    net2 = build_dafar("mnist", with_detector=False)
    opt2 = torch.optim.Adam(net2.parameters(), 1e-3)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, 1e-3, total_steps=10)
    assert load_checkpoint(tmp_path / "ck", net2, opt2, sched2) == {"epochs_done": 1}
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # a checkpoint whose tensors were swapped is refused
    (tmp_path / "ck.safetensors").write_bytes((tmp_path / "ck.safetensors").read_bytes()[:-1] + b" ")
    from dafar.errors import TrainingError
    with pytest.raises(TrainingError, match="does not match"):
        load_checkpoint(tmp_path / "ck", net2, opt2, sched2)
