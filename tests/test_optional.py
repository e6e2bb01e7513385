"""import_or_skip: a missing or broken optional package skips, it never aborts collection."""
import pytest

from optional import import_or_skip


def test_present_module_and_names_are_returned():
    import json

    assert import_or_skip("json") is json
    assert import_or_skip("json", "dumps") is json.dumps
    assert import_or_skip("json", "dumps", "loads") == [json.dumps, json.loads]


@pytest.mark.parametrize("module, names", [("no_such_package_here", ()), ("json", ("no_such_name",))])
def test_missing_module_or_name_skips_with_the_reason(module, names):
    with pytest.raises(pytest.skip.Exception, match="is not usable here"):
        import_or_skip(module, *names)
