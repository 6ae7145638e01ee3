"""scripts/levers.py's variants patch what they name, and put it back: a knock-out whose kernel
name matched nothing would time the baseline again under another label."""

import importlib.util
from pathlib import Path

import pytest

from optimum_disc.compiler import runtime
from optimum_disc.kernels import attention

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "levers.py"


@pytest.fixture(scope="module")
def levers():
    spec = importlib.util.spec_from_file_location("levers_script", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, kernel",
    [("no_layernorm", "layer_norm"), ("no_attention", "attention"), ("no_gelu", "linear")],
)
def test_knock_outs_replace_a_launched_kernel_and_restore_it(levers, name, kernel):
    before = dict(runtime._LAUNCH)
    with levers.lever_off(name):
        assert set(runtime._LAUNCH) == set(before), "a knock-out added a kernel name"
        assert runtime._LAUNCH[kernel] is not before[kernel]
        others = [k for k in before if k != kernel]
        assert all(runtime._LAUNCH[k] is before[k] for k in others)
    assert before == runtime._LAUNCH


def test_attention16_takes_four_numbers(levers):
    shipped = attention._launch_config
    with levers.lever_off("attention16_32x32x4x2"):
        assert attention._launch_config is not shipped
    assert attention._launch_config is shipped
    with (
        pytest.raises(ValueError, match="attention16_BMxBNxWxS"),
        levers.lever_off("attention16_32x32x4"),
    ):
        pass


def test_unknown_lever_is_refused(levers):
    with (
        pytest.raises(ValueError, match="unknown lever 'no_softmax'"),
        levers.lever_off("no_softmax"),
    ):
        pass


def test_layernorm_rows_lever_launches_one_row_per_program_and_restores_it(levers):
    from optimum_disc.kernels import layernorm

    big = layernorm.MULTI_ROW_MIN_M
    assert layernorm.launch_config(big, 768)[1] > 1
    with levers.lever_off("layernorm_rows"):
        assert layernorm.launch_config(big, 768)[1] == 1
    assert layernorm.launch_config(big, 768)[1] > 1


def test_ahead_lever_stops_graphs_running_ahead_and_restores_it(levers):
    before = runtime._AHEAD_AFTER
    with levers.lever_off("ahead"):
        assert runtime._AHEAD_AFTER > 10**9
    assert before == runtime._AHEAD_AFTER


def test_split_k_lever_removes_the_split_k_candidates_and_restores_them(levers):
    from optimum_disc.kernels import matmul

    small = matmul._SPLIT_K_CANDIDATES
    assert any(small.values())
    with levers.lever_off("split_k"):
        assert not any(matmul._SPLIT_K_CANDIDATES.values())
    assert matmul._SPLIT_K_CANDIDATES is small


def test_first_token_rows_lever_drops_only_that_pass(levers):
    import optimum_disc.compiler as compiler

    before = compiler.PASSES
    assert "first_token_rows" in [p.__name__ for p in before]
    with levers.lever_off("first_token_rows"):
        assert [p.__name__ for p in compiler.PASSES] == [
            p.__name__ for p in before if p.__name__ != "first_token_rows"
        ]
    assert compiler.PASSES is before


def test_stats_to_host_lever_turns_it_off_and_back_on(levers):
    assert runtime._STATS_TO_HOST is True
    with levers.lever_off("stats_to_host"):
        assert runtime._STATS_TO_HOST is False
    assert runtime._STATS_TO_HOST is True


def test_input_graphs_lever_turns_them_off_and_back_on(levers):
    assert runtime._INPUT_GRAPHS is True
    with levers.lever_off("input_graphs"):
        assert runtime._INPUT_GRAPHS is False
    assert runtime._INPUT_GRAPHS is True


def test_two_levers_joined_by_plus_turn_both_off_and_restore_both(levers):
    from optimum_disc.kernels import matmul

    small, ahead = matmul._SPLIT_K_CANDIDATES, runtime._AHEAD_AFTER
    with levers.lever_off("split_k+ahead") as settings:
        assert not any(matmul._SPLIT_K_CANDIDATES.values())
        assert runtime._AHEAD_AFTER > 10**9
        assert settings == {}
    with levers.lever_off("cuda_graphs+remove_padding") as settings:
        assert settings == {"cuda_graphs": False, "remove_padding": False}
    assert matmul._SPLIT_K_CANDIDATES is small and ahead == runtime._AHEAD_AFTER


def test_an_unknown_lever_in_a_pair_is_refused_and_the_other_restored(levers):
    ahead = runtime._AHEAD_AFTER
    with (
        pytest.raises(ValueError, match="unknown lever 'no_softmax'"),
        levers.lever_off("ahead+no_softmax"),
    ):
        pass
    assert ahead == runtime._AHEAD_AFTER
