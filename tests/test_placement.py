"""lnscope.toml's [workers] tables and the local executor's placement of roles on devices."""

import pytest

from lnscope.analysis.errors import ConfigError, UnknownRoleError
from lnscope.analysis.pairs import ROLES, PairRegistry, WorkerSpec, builtin_pairs, parse_memory, place_roles

MINE = '[pairs.mine]\noriginal = "gpt2"\nln_free = "a/b"\n'
TRIO = '[pairs.trio]\noriginal = "gpt2"\nln_free = "a/b"\ncontrol = "c/d"\n'


def load(tmp_path, text):
    cfg = tmp_path / "lnscope.toml"
    cfg.write_text(text)
    return PairRegistry.load(cfg)


def test_top_level_workers_apply_to_builtin_and_configured_pairs(tmp_path):
    registry = load(tmp_path, MINE + (
        '[workers.original]\ndevice = "cuda:0"\nnum_gpus = 1\nnum_cpus = 2\nmemory = "20GB"\n'
        '[workers.ln_free]\ndevice = "cuda:1"\nnum_gpus = 0.5\n'
    ))
    for name in ("tiny", "gpt2-small", "mine"):
        pair = registry.get(name)
        assert pair.worker("original") == WorkerSpec(device="cuda:0", num_gpus=1, num_cpus=2, memory_bytes=20 * 10**9)
        assert pair.worker("ln_free") == WorkerSpec(device="cuda:1", num_gpus=0.5)
    assert registry.get("tiny").worker("control") == WorkerSpec()


def test_pair_workers_override_the_top_level_field_by_field(tmp_path):
    registry = load(tmp_path, TRIO + (
        '[pairs.trio.workers.ln_free]\ndevice = "cuda:2"\nmemory = 1024\n'
        '[pairs.trio.workers.control]\nnum_cpus = 4\n'
        '[workers.ln_free]\ndevice = "cuda:1"\nnum_gpus = 1\nmemory = "1GiB"\n'
    ))
    trio = registry.get("trio")
    assert trio.worker("ln_free") == WorkerSpec(device="cuda:2", num_gpus=1, memory_bytes=1024)
    assert trio.worker("control") == WorkerSpec(num_cpus=4)
    assert trio.worker("original") == WorkerSpec()
    assert registry.get("tiny").worker("ln_free") == WorkerSpec(device="cuda:1", num_gpus=1, memory_bytes=2**30)
    assert registry.get("tiny").worker("control") == WorkerSpec()  # a pair's own table stays its own


def test_pair_workers_without_a_top_level_table(tmp_path):
    registry = load(tmp_path, MINE + '[pairs.mine.workers.original]\ndevice = "mps"\n')
    assert registry.get("mine").worker("original").device == "mps"
    assert registry.get("tiny").workers == {}


def test_top_level_control_worker_skips_pairs_without_a_control(tmp_path):
    registry = load(tmp_path, MINE + '[workers.control]\ndevice = "cpu"\n')
    assert "control" not in registry.get("mine").workers
    assert registry.get("tiny").worker("control").device == "cpu"


def test_no_config_leaves_every_pair_unplaced():
    assert all(pair.workers == {} for pair in PairRegistry.load())


@pytest.mark.parametrize(
    "text, expected",
    [
        (1234, 1234),
        ("20GB", 20 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("10 KB", 10_000),
        ("3kib", 3072),
        ("7MB", 7 * 10**6),
        ("100B", 100),
        ("2048", 2048),
    ],
)
def test_memory_sizes(text, expected):
    assert parse_memory(text, where="x") == expected


def test_memory_string_in_a_config(tmp_path):
    registry = load(tmp_path, '[workers.original]\nmemory = "512MiB"\n')
    assert registry.get("tiny").worker("original").memory_bytes == 512 * 2**20


@pytest.mark.parametrize(
    "text, message",
    [
        ('[workers.original]\nnum_gpus = -1\n', r"workers\.original\.num_gpus: expected a number >= 0"),
        ('[workers.original]\nnum_gpus = "one"\n', r"workers\.original\.num_gpus: expected a number >= 0"),
        ('[workers.original]\nnum_gpus = true\n', r"workers\.original\.num_gpus: expected a number >= 0"),
        ('[workers.original]\nnum_cpus = 0\n', r"workers\.original\.num_cpus: expected a number > 0"),
        ('[workers.ln_free]\ndevice = "gpu1"\n', r"workers\.ln_free\.device: expected a device"),
        ('[workers.ln_free]\ndevice = 1\n', r"workers\.ln_free\.device: expected a device"),
        ('[workers.ln_free]\ndevice = "cuda:x"\n', r"workers\.ln_free\.device: expected a device"),
        ('[workers.control]\nmemory = "20XB"\n', r"workers\.control\.memory: expected a number of bytes"),
        ('[workers.control]\nmemory = 0\n', r"workers\.control\.memory: expected a number of bytes"),
        ('[workers.control]\nmemory = -5\n', r"workers\.control\.memory: expected a number of bytes"),
        ('[workers.control]\nmemory = 1.5\n', r"workers\.control\.memory: expected a number of bytes"),
        ('[workers.control]\nmemory = "GB"\n', r"workers\.control\.memory: expected a number of bytes"),
        ('[workers.original]\ngpus = 1\n', r"workers\.original\.gpus: unknown key \(allowed: device, num_gpus"),
        ('[workers.critic]\ndevice = "cpu"\n', r"workers\.critic: unknown role \(roles: original, ln_free, control\)"),
        ('[workers]\noriginal = "cuda:0"\n', r"workers\.original: expected a table"),
        ('workers = "cuda"\n', r"workers: expected a table"),
        (MINE + '[pairs.mine.workers.ln_free]\nnum_gpus = -0.5\n',
         r"pairs\.mine\.workers\.ln_free\.num_gpus: expected a number >= 0"),
        (MINE + '[pairs.mine.workers.ln_free]\nplace = "cpu"\n', r"pairs\.mine\.workers\.ln_free\.place: unknown key"),
        (MINE + '[pairs.mine.workers.judge]\ndevice = "cpu"\n', r"pairs\.mine\.workers\.judge: unknown role"),
        (MINE + '[pairs.mine.workers.control]\ndevice = "cpu"\n',
         r"pairs\.mine\.workers\.control: the pair has no `control` model"),
    ],
)
def test_bad_workers_are_refused_with_the_file_and_key_path(tmp_path, text, message):
    cfg = tmp_path / "lnscope.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        PairRegistry.load(cfg)
    assert str(caught.value).startswith(str(cfg))


def test_place_roles_on_a_three_gpu_machine(tmp_path):
    registry = load(tmp_path, (
        '[workers.original]\ndevice = "cuda:0"\n[workers.ln_free]\ndevice = "cuda:1"\n'
        '[workers.control]\ndevice = "cuda:2"\n'
    ))
    placement = place_roles(registry.get("tiny"), ROLES, "cpu", device_count=3)
    assert placement == {"original": "cuda:0", "ln_free": "cuda:1", "control": "cuda:2"}


def test_place_roles_refuses_a_gpu_the_machine_lacks(tmp_path):
    registry = load(tmp_path, '[workers.control]\ndevice = "cuda:2"\n')
    with pytest.raises(ConfigError, match=r"pair 'tiny', role 'control': device 'cuda:2'.*2 CUDA device"):
        place_roles(registry.get("tiny"), ROLES, "cuda:0", device_count=2)
    assert place_roles(registry.get("tiny"), ["original", "ln_free"], "cuda:0", device_count=2) == {
        "original": "cuda:0", "ln_free": "cuda:0"}


def test_place_roles_checks_the_default_device_too():
    with pytest.raises(ConfigError, match="role 'original'"):
        place_roles(builtin_pairs()["tiny"], ["original"], "cuda:1", device_count=1)
    with pytest.raises(ConfigError, match=r"0 CUDA device\(s\): none"):
        place_roles(builtin_pairs()["tiny"], ["original"], "cuda:0", device_count=0)


def test_place_roles_uses_the_default_device_when_nothing_is_configured():
    tiny = builtin_pairs()["tiny"]
    assert place_roles(tiny, ROLES, "cpu") == dict.fromkeys(ROLES, "cpu")
    assert place_roles(tiny, ["ln_free"], "cuda", device_count=0) == {"ln_free": "cuda"}


def test_place_roles_mixes_configured_and_default_devices(tmp_path):
    registry = load(tmp_path, MINE + '[pairs.mine.workers.ln_free]\ndevice = "cuda:1"\n')
    assert place_roles(registry.get("mine"), ["original", "ln_free"], "cuda:0", device_count=2) == {
        "original": "cuda:0", "ln_free": "cuda:1"}


def test_place_roles_rejects_a_role_the_pair_lacks(tmp_path):
    registry = load(tmp_path, MINE)
    with pytest.raises(UnknownRoleError, match="control"):
        place_roles(registry.get("mine"), ["control"], "cpu")


def test_place_roles_skips_the_count_check_without_cuda(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    registry = load(tmp_path, '[workers.original]\ndevice = "cuda:7"\n')
    assert place_roles(registry.get("tiny"), ["original"], "cpu") == {"original": "cuda:7"}
