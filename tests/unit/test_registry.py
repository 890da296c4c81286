import pytest

from remix_megatron.registry import Registry

pytestmark = pytest.mark.unit


def test_register_and_get():
    reg = Registry[int]("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg


def test_duplicate_rejected():
    reg = Registry[int]("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_lists_known_and_suggests():
    reg = Registry[int]("loss")
    for name in ("ppo", "grpo", "mix_ppg"):
        reg.register(name, 0)
    with pytest.raises(ValueError) as info:
        reg.get("gpro")
    message = str(info.value)
    assert "unknown loss 'gpro'" in message and "did you mean 'grpo'" in message
    assert "Known: grpo, mix_ppg, ppo" in message


@pytest.mark.parametrize("bad", ["", " padded"])
def test_bad_names_rejected(bad):
    with pytest.raises(ValueError, match="non-empty"):
        Registry[int]("widget").register(bad, 0)
