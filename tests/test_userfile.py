"""Objects from the user's own files: a plain function is a factory, called once without arguments."""

import pytest

from flowprobe.userfile import load_user_value


def test_load_user_value_calls_factories_and_refuses_bad_ones(tmp_path):
    path = tmp_path / "user.py"
    path.write_text("class Box:\n    pass\n\nvalue = 3\n\ndef factory():\n    return 7\n\ndef star(*args, **kw):\n"
                    "    return len(args)\n\ndef needs(x):\n    return x\n\n"
                    "def boom():\n    raise RuntimeError('no')\n")
    assert load_user_value(f"{path}:value") == 3
    assert load_user_value(f"{path}:factory") == 7
    assert load_user_value(f"{path}:star") == 0  # *args and **kwargs are not required arguments
    assert isinstance(load_user_value(f"{path}:Box"), type)  # a class is an object, not a factory
    with pytest.raises(ValueError, match="needs is a function with required arguments; expected a flow or"):
        load_user_value(f"{path}:needs", "a flow")
    with pytest.raises(ValueError, match="boom failed: RuntimeError: no"):
        load_user_value(f"{path}:boom")
