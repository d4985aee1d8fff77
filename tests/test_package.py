import importlib

import univigu


def test_every_public_name_resolves_to_its_module_object():
    """`univigu.X` for every name in `univigu.__all__` (imported lazily) is the object its module defines."""
    for name, module in univigu._EXPORTS.items():
        assert getattr(univigu, name) is getattr(importlib.import_module(module), name), name
    assert set(univigu._EXPORTS) <= set(univigu.__all__) == set(dir(univigu))
    assert {"UniViGUTransformer", "UniViGUPipeline", "StageConfig", "ResumeError"} <= set(univigu.__all__)


def test_version_is_the_installed_distribution_version():
    """`univigu.__version__` and pyproject.toml's version (what pip installed) are one number."""
    from importlib.metadata import version

    assert univigu.__version__ == version("univigu")
