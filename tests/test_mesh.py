import jax
import pytest

from jaxmp.mesh import AXES, MeshError, format_mesh, make_mesh, parse_mesh, simulate_cpu_devices


def test_parse_fills_omitted_axes_and_minus_one():
    assert parse_mesh("data:2,pipe:2,tensor:2", 8) == {"data": 2, "fsdp": 1, "pipe": 2,
                                                       "expert": 1, "context": 1, "tensor": 2}
    assert parse_mesh("tensor:2,data:-1", 8) == {"data": 4, "fsdp": 1, "pipe": 1, "expert": 1,
                                                 "context": 1, "tensor": 2}
    assert parse_mesh("context:-1,tensor:2", 8)["context"] == 4
    assert parse_mesh("", 1) == {a: 1 for a in AXES}


@pytest.mark.parametrize("spec,msg", [
    ("model:8", "unknown mesh axis 'model'"),
    ("data:2,data:4", "appears twice"),
    ("data:0,tensor:8", "sizes are >= 1"),
    ("data:-1,tensor:-1", "at most one axis may be -1"),
    ("data:3", "needs 3 devices but 8 are present"),
    ("data:3,tensor:-1", "does not divide the 8 devices"),
    ("data", "has no size"),
    ("data:x", "not an integer"),
])
def test_bad_mesh_strings(spec, msg):
    with pytest.raises(MeshError, match=msg):
        parse_mesh(spec, 8)


def test_wrong_product_suggests_fitting_meshes():
    with pytest.raises(MeshError, match=r"multiply to 8, e\.g\. data:8"):
        parse_mesh("data:2,tensor:2", 8)


def test_make_mesh_axes_and_order():
    mesh = make_mesh("data:2,pipe:2,tensor:2")
    assert mesh.axis_names == AXES == ("data", "fsdp", "pipe", "expert", "context", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "pipe": 2, "expert": 1, "context": 1,
                                "tensor": 2}
    # tensor innermost: neighbouring device ids share a tensor group
    assert [d.id for d in mesh.devices[0, 0, 0, 0, 0, :]] == [0, 1]
    assert format_mesh(mesh) == "data:2,pipe:2,tensor:2"
    # context next to tensor: a context group spans neighbouring tensor groups
    mesh = make_mesh("data:2,context:2,tensor:2")
    assert [d.id for d in mesh.devices[0, 0, 0, 0, :, 0]] == [0, 2]
    assert format_mesh(mesh) == "data:2,context:2,tensor:2"


def test_simulate_after_backend_started_is_a_clear_error():
    jax.devices()
    with pytest.raises(MeshError, match="already started with 8"):
        simulate_cpu_devices(4)
    simulate_cpu_devices(8)  # the same count is fine
