"""One schema source: every op's schema is declared once, in its module of worm/ops/
(``SCHEMA``, collected in ``worm.ops.SCHEMAS``); the public ops ``torch.ops.worm.*`` are
defined from it, and the native library ``torch.ops.worm_native.*`` (csrc/register.cpp)
must declare exactly the same schemas, modulo the namespace."""
import pytest
import torch

from worm import _backends, ops
from worm.ops import mask_update, sample_mask, sgd_step, threshold_select, truncate

OPS = ("select_thresholds", "mask_update_", "sample_mask_", "truncate_", "sgd_step_")


def _parsed(schema: str):
    return torch._C.parse_schema(f"worm::{schema}")


def test_every_op_has_one_schema_in_its_module():
    assert set(ops.SCHEMAS) == set(OPS)
    for name, mod in (("select_thresholds", threshold_select), ("mask_update_", mask_update),
                      ("sample_mask_", sample_mask), ("truncate_", truncate),
                      ("sgd_step_", sgd_step)):
        assert ops.SCHEMAS[name] == mod.SCHEMA
        assert str(getattr(torch.ops.worm, name).default._schema) == str(_parsed(mod.SCHEMA))


@pytest.mark.skipif(_backends.unusable("cpp", torch.device("cpu")) is not None,
                    reason="worm._C is not built (tests/ops/test_backends.py checks that it is)")
def test_native_schemas_are_the_python_ones():
    for name in OPS:
        native = getattr(torch.ops.worm_native, name).default._schema
        assert native.name == f"worm_native::{name}"
        # the same arguments, returns, aliasing and kwarg-only marks, modulo the namespace
        got = str(native).replace("worm_native::", "worm::", 1)
        assert got == str(_parsed(ops.SCHEMAS[name])), name
