"""Direct ``torch.ops.chimera.*`` calls with malformed index arguments raise a clean
``RuntimeError`` that names the op and the argument, before anything is dereferenced.

Each case runs in a worker process, so that an out-of-bounds access that crashes (a segfault, a
heap corruption) fails its own test instead of killing the test run; a case that returns a value
fails too (no wrong number). One worker runs all the cases and reports each as it finishes; when
one crashes, a fresh worker goes on with the rest."""
import re

import pytest
import torch

import worker_cases

# name: (code evaluated with T = torch.tensor, L = a long tensor, ops = torch.ops.chimera and the
# helpers below, the op and argument the message must name, then a pattern of the message,
# whether the case also runs on CUDA (under torch_geometric.debug(): the device-side checks)).
CASES = {
    # The fuzzing findings of the reliability issue.
    "spmm_rowptr_past_col": ("ops.spmm(L([0, 4]), L([0]), ones(1, 1), ones(1, 1, 1))",
                             r"chimera::spmm: rowptr\[-1\] must equal len\(col\) = 1, got 4", False),
    "spmm_rowptr_negative_start": ("ops.spmm(L([-10**8, 1]), L([0]), ones(1, 1), ones(1, 1, 1))",
                                   r"chimera::spmm: rowptr\[0\] must be 0", True),
    "edge_dot_rowptr_past_col": ("ops.edge_dot(L([0, 1000]), L([0]), ones(1, 1, 2), ones(1, 1, 2))",
                                 r"chimera::edge_dot: rowptr\[-1\] must equal len\(col\) = 1", True),
    "dag_solve_level_ptr_past_n": ("ops.dag_solve(L([0, 5, 3]), L([0, 1, 2]), L([0, 0, 1, 2]), L([0, 1]), "
                                   "ones(2, 1), ones(3, 1, 1))",
                                   "chimera::dag_solve: level_ptr must be non-decreasing", True),
    "dag_solve_level_ptr_end_past_n": ("ops.dag_solve(L([0, 1, 7]), L([0, 1, 2]), L([0, 0, 1, 2]), L([0, 1]), "
                                       "ones(2, 1), ones(3, 1, 1))",
                                       r"chimera::dag_solve: level_ptr\[-1\] must equal the number of nodes N = 3",
                                       True),
    "dag_solve_level_ptr_non_monotone": ("ops.dag_solve(L([0, 2, 1, 3]), L([0, 1, 2]), L([0, 0, 1, 2]), L([0, 1]), "
                                         "ones(2, 1), ones(3, 1, 1))",
                                         "chimera::dag_solve: level_ptr must be non-decreasing", True),
    "dag_solve_empty_level_ptr": ("ops.dag_solve(L([]), L([0, 1, 2]), L([0, 0, 1, 2]), L([0, 1]), ones(2, 1), "
                                  "ones(3, 1, 1))",
                                  r"chimera::dag_solve: level_ptr must be a 1-D int64 tensor with L \+ 1 >= 1", True),
    "dag_solve_rowptr_past_col": ("ops.dag_solve(L([0, 1, 2, 3]), L([0, 1, 2]), L([0, 0, 1, 9]), L([0, 1]), "
                                  "ones(2, 1), ones(3, 1, 1))",
                                  r"chimera::dag_solve: rowptr\[-1\] must equal len\(col\) = 2", True),
    "band_solve_order_out_of_range": ("ops.band_solve(L([0, 3]), L([0, 1, 99]), L([1]), ones(9, 1), ones(3, 1, 2))",
                                      "chimera::band_solve: order must be a permutation of 0..N-1", False),
    "band_solve_node_ptr_out_of_range": ("ops.band_solve(L([0, 99, 3]), L([0, 1, 2]), L([0, 0]), ones(3, 1), "
                                         "ones(3, 1, 2))",
                                         "chimera::band_solve: node_ptr must be non-decreasing", False),
    "band_solve_negative_bandwidth": ("ops.band_solve(L([0, 3]), L([0, 1, 2]), L([-1]), ones(3, 1), ones(3, 1, 2))",
                                      r"chimera::band_solve: bandwidth\[0\] = -1 must lie in \[0, 2\]", False),
    "band_order_nodes_out_of_range": ("ops.band_order(L([0, 3]), L([0, 1, 99]), L([0, 1, 2, 2]), L([1, 0]))",
                                      "chimera::band_order: nodes must be a permutation of 0..N-1", False),
    "band_order_node_ptr_out_of_range": ("ops.band_order(L([0, 99]), L([0, 1, 2]), L([0, 1, 2, 2]), L([1, 0]))",
                                         r"chimera::band_order: node_ptr\[-1\] must equal the number of nodes N = 3",
                                         False),
    "band_attention_order_out_of_range": ("ops.band_attention(L([0, 3]), L([0, -5, 2]), L([0]), ones(3, 1), "
                                          "ones(3, 1, 2), ones(3, 1, 2), ones(3, 1, 2))",
                                          "chimera::band_attention: order must be a permutation of 0..N-1", False),
    "band_attention_node_ptr_out_of_range": ("ops.band_attention(L([0, 1000]), L([0, 1, 2]), L([0]), ones(3, 1), "
                                             "ones(3, 1, 2), ones(3, 1, 2), ones(3, 1, 2))",
                                             r"chimera::band_attention: node_ptr\[-1\] must equal", False),
    # A too-large rowptr once read as a bogus "col[1] = 94799218408454 is out of range".
    "spmm_too_large_rowptr_names_rowptr": ("ops.spmm(L([0, 1, 3]), L([0, 1]), ones(2, 1), ones(2, 1, 1))",
                                           r"chimera::spmm: rowptr\[-1\] must equal len\(col\) = 2", True),
    # More of the same class.
    "spmm_rowptr_non_monotone": ("ops.spmm(L([0, 2, 1, 2]), L([0, 1]), ones(2, 1), ones(2, 1, 1))",
                                 "chimera::spmm: rowptr must be non-decreasing", True),
    "spmm_int32_rowptr_past_col": ("ops.spmm(I([0, 5]), I([0]), ones(1, 1), ones(1, 1, 1))",
                                   r"chimera::spmm: rowptr\[-1\] must equal len\(col\) = 1", True),
    "spmm_col_out_of_range": ("ops.spmm(L([0, 1]), L([5]), ones(1, 1), ones(1, 1, 1))",
                              r"chimera::spmm: col\[0\] = 5 is out of range \[0, 1\)", False),
    "edge_dot_rowptr_negative_start": ("ops.edge_dot(L([-3, 1]), L([0]), ones(1, 1, 2), ones(1, 1, 2))",
                                       r"chimera::edge_dot: rowptr\[0\] must be 0", True),
    "dag_solve_order_repeats_a_node": ("ops.dag_solve(L([0, 1, 2, 3]), L([0, 0, 2]), L([0, 0, 1, 2]), L([0, 1]), "
                                       "ones(2, 1), ones(3, 1, 1))",
                                       "chimera::dag_solve: order must be a permutation of 0..N-1",
                                       True),
    "dag_solve_order_out_of_range": ("ops.dag_solve(L([0, 1, 2, 3]), L([0, 1, 3]), L([0, 0, 1, 2]), L([0, 1]), "
                                     "ones(2, 1), ones(3, 1, 1))",
                                     "chimera::dag_solve: order must be a permutation of 0..N-1", True),
    "dag_solve_rowptr_non_monotone": ("ops.dag_solve(L([0, 1, 2, 3]), L([0, 1, 2]), L([0, 2, 1, 2]), L([0, 1]), "
                                      "ones(2, 1), ones(3, 1, 1))",
                                      "chimera::dag_solve: rowptr must be non-decreasing", True),
    "dag_attention_level_ptr_past_n": ("ops.dag_attention(L([0, 9, 3]), L([0, 1, 2]), L([0, 0, 1, 2]), L([0, 1]), "
                                       "ones(2, 1), ones(3, 1, 2), ones(3, 1, 2), ones(3, 1, 2))",
                                       "chimera::dag_attention: level_ptr must be non-decreasing", False),
    "dag_attention_rowptr_past_col": ("ops.dag_attention(L([0, 1, 2, 3]), L([0, 1, 2]), L([0, 0, 1, 5]), L([0, 1]), "
                                      "ones(2, 1), ones(3, 1, 2), ones(3, 1, 2), ones(3, 1, 2))",
                                      r"chimera::dag_attention: rowptr\[-1\] must equal len\(col\) = 2", False),
    "dag_attention_backward_rowptr_t_past_col": (
        "ops.dag_attention_backward(L([0, 1, 2, 3]), L([2, 1, 0]), L([0, 1, 2, 7]), L([1, 2]), ones(2, 1), "
        "ones(3, 1, 2), ones(3, 1, 2), ones(3, 1, 2), ones(3, 1, 4), ones(3, 1, 2))",
        r"chimera::dag_attention_backward: rowptr_t\[-1\] must equal len\(col_t\) = 2", False),
    "dag_attention_backward_state_with_fewer_heads": (
        "ops.dag_attention_backward(L([0, 3]), L([0, 1, 2]), L([0, 0, 0, 0]), L([]), ones(0, 2), "
        "ones(3, 2, 2), ones(3, 2, 2), ones(3, 2, 2), ones(3, 1, 4), ones(3, 2, 2))",
        r"chimera::dag_attention_backward: expected .* state \[N, H, S \* P\]", False),
    "band_factor_rowptr_past_col": ("ops.band_factor(L([0, 2]), L([0, 1]), L([1]), L([0, 1, 5]), L([1]), "
                                    "ones(1, 1), 6)",
                                    r"chimera::band_factor: rowptr\[-1\] must equal len\(col\) = 1", False),
    "band_factor_bandwidth_past_graph": ("ops.band_factor(L([0, 2]), L([0, 1]), L([10**17]), L([0, 1, 1]), L([1]), "
                                         "ones(1, 1), 6)",
                                         r"chimera::band_factor: bandwidth\[0\] = 100000000000000000 must lie in",
                                         False),
    "band_factor_node_ptr_non_monotone": ("ops.band_factor(L([0, 2, 1, 2]), L([0, 1]), L([0, 0, 0]), L([0, 1, 1]), "
                                          "L([1]), ones(1, 1), 2)",
                                          "chimera::band_factor: node_ptr must be non-decreasing", False),
    "band_order_nodes_unsorted": ("ops.band_order(L([0, 3]), L([2, 0, 1]), L([0, 1, 2, 2]), L([1, 0]))",
                                  "chimera::band_order: nodes must be sorted within each graph", False),
    "band_order_rowptr_past_col": ("ops.band_order(L([0, 3]), L([0, 1, 2]), L([0, 1, 2, 40]), L([1, 0]))",
                                   r"chimera::band_order: rowptr\[-1\] must equal len\(col\) = 2", False),
    "band_solve_order_repeats_a_node": ("ops.band_solve(L([0, 3]), L([0, 0, 2]), L([0]), ones(3, 1), ones(3, 1, 2))",
                                        "chimera::band_solve: order must be a permutation .* appears twice", False),
    "band_attention_backward_value_with_fewer_heads": (
        "ops.band_attention_backward(L([0, 3]), L([0, 1, 2]), L([0]), ones(3, 2), ones(3, 2, 2), ones(3, 2, 2), "
        "ones(3, 1, 2), ones(3, 2, 4), ones(3, 1, 2))",
        r"chimera::band_attention_backward: expected .* value, grad_y \[N, H, P\]", False),
}


def grid_case(backward=False, graph_ptr="L([0, 4])", row_width="L([2])", nodes="L([0, 1, 2, 3])",
              weight="ones(4, 2, 1)", segment_rows=1, num_checkpoints=2, checkpoints="ones(2, 1, 4)",
              grad_y="ones(4, 1, 2)"):
    """The code of a chimera::grid_attention (or _backward) call on one 2 x 2 image (H = 1, S = P = 2)
    that is valid (one checkpointed row of 2 positions) but for the arguments given."""
    common = f"{graph_ptr}, {row_width}, {nodes}, {weight}, ones(4, 1, 2), ones(4, 1, 2), ones(4, 1, 2)"
    if backward:
        return f"ops.grid_attention_backward({common}, {checkpoints}, {grad_y}, {segment_rows}, {num_checkpoints})"
    return f"ops.grid_attention({common}, {segment_rows}, {num_checkpoints})"


GRID = r"chimera::grid_attention: "
GRID_BACKWARD = r"chimera::grid_attention_backward: "
TWO_IMAGES = dict(graph_ptr="L([0, 2, 4])", row_width="L([2, 2])", num_checkpoints=0)
CASES.update({
    "grid_graph_ptr_not_starting_at_0": (grid_case(graph_ptr="L([1, 4])"), GRID + r"graph_ptr\[0\] must be 0, got 1",
                                         False),
    "grid_graph_ptr_decreasing": (grid_case(graph_ptr="L([0, 3, 1, 4])", row_width="L([1, 1, 1])"),
                                  GRID + "graph_ptr must be non-decreasing", False),
    "grid_graph_ptr_past_n": (grid_case(graph_ptr="L([0, 8])"),
                              GRID + r"graph_ptr\[-1\] must equal the number of nodes N = 4, got 8", False),
    "grid_graph_ptr_short_of_n": (grid_case(graph_ptr="L([0, 2])", num_checkpoints=0),
                                  GRID + r"graph_ptr\[-1\] must equal the number of nodes N = 4, got 2", False),
    "grid_graph_ptr_empty": (grid_case(graph_ptr="L([])", row_width="L([])"),
                             GRID + r"graph_ptr must be a 1-D int64 tensor with G \+ 1 >= 1 entries", False),
    "grid_graph_ptr_int32": (grid_case(graph_ptr="I([0, 4])"), GRID + "graph_ptr must be a 1-D int64 tensor", False),
    "grid_row_width_not_dividing": (grid_case(row_width="L([3])"),
                                    GRID + r"row_width\[0\] must be positive and divide the graph's 4 nodes, got 3",
                                    False),
    "grid_row_width_zero": (grid_case(row_width="L([0])"), GRID + r"row_width\[0\] must be positive .*, got 0", False),
    "grid_row_width_negative": (grid_case(row_width="L([-2])"), GRID + r"row_width\[0\] must be positive .*, got -2",
                                False),
    "grid_row_width_of_the_second_image": (grid_case(graph_ptr="L([0, 1, 4])", row_width="L([1, 2])"),
                                           GRID + r"row_width\[1\] must be positive and divide the graph's 3 nodes",
                                           False),
    "grid_row_width_one_per_image_missing": (grid_case(row_width="L([2, 2])"),
                                             GRID + "row_width must be a 1-D int64 tensor with G = 1 entries", False),
    "grid_nodes_repeat_a_node": (grid_case(nodes="L([0, 1, 1, 3])"),
                                 GRID + r"nodes must be a permutation of 0..N-1 \(N = 4\), but 1 appears twice", False),
    "grid_nodes_out_of_range": (grid_case(nodes="L([0, 1, 2, 9])"),
                                GRID + r"nodes must be a permutation .* got nodes\[3\] = 9", False),
    "grid_nodes_negative": (grid_case(nodes="L([0, -1, 2, 3])"),
                            GRID + r"nodes must be a permutation .* got nodes\[1\] = -1", False),
    "grid_nodes_leave_their_image": (grid_case(nodes="L([0, 2, 1, 3])", **TWO_IMAGES),
                                     GRID + r"nodes\[1\] = 2 leaves graph 0 \(nodes 0 to 1\)", False),
    "grid_nodes_too_few": (grid_case(nodes="L([0, 1, 2])"),
                           GRID + "nodes must be a 1-D int64 permutation of the 4 nodes", False),
    "grid_weight_without_the_second_slot": (grid_case(weight="ones(4, 1, 1)"),
                                            GRID + r"weight must have shape \[N, 2, H\] = \[4, 2, 1\]", False),
    "grid_weight_with_more_heads": (grid_case(weight="ones(4, 2, 2)"),
                                    GRID + r"weight must have shape \[N, 2, H\] = \[4, 2, 1\]", False),
    "grid_weight_with_fewer_nodes": (grid_case(weight="ones(3, 2, 1)"),
                                     GRID + r"weight must have shape \[N, 2, H\] = \[4, 2, 1\]", False),
    "grid_weight_float64": (grid_case(weight="ones(4, 2, 1).double()"),
                            GRID + r"weight must have shape .* and the dtype of query, got .* Double", False),
    "grid_num_checkpoints_too_many": (grid_case(num_checkpoints=5),
                                      GRID + r"num_checkpoints must be the number of checkpointed positions.* = 2, "
                                             r"got 5", False),
    "grid_num_checkpoints_negative": (grid_case(num_checkpoints=-1),
                                      GRID + r"num_checkpoints must be .* = 2, got -1", False),
    "grid_num_checkpoints_of_other_segment_rows": (grid_case(segment_rows=2),
                                                   GRID + r"num_checkpoints must be .* = 0, got 2", False),
    "grid_segment_rows_zero": (grid_case(segment_rows=0), GRID + "segment_rows must be at least 1, got 0", False),
    "grid_segment_rows_negative": (grid_case(segment_rows=-3), GRID + "segment_rows must be at least 1, got -3",
                                   False),
    "grid_backward_checkpoints_too_few": (grid_case(True, checkpoints="ones(1, 1, 4)"),
                                          GRID_BACKWARD + r"checkpoints must have shape \[2, 1, 4\]", False),
    "grid_backward_checkpoints_of_other_features": (grid_case(True, checkpoints="ones(2, 1, 3)"),
                                                    GRID_BACKWARD + r"checkpoints must have shape \[2, 1, 4\]", False),
    "grid_backward_checkpoints_2d": (grid_case(True, checkpoints="ones(2, 4)"),
                                     GRID_BACKWARD + r"checkpoints must have shape \[N, H, F\]", False),
    "grid_backward_checkpoints_float64": (grid_case(True, checkpoints="ones(2, 1, 4).double()"),
                                          GRID_BACKWARD + "checkpoints must have dtype Float", False),
    "grid_backward_grad_y_of_other_shape": (grid_case(True, grad_y="ones(4, 1, 3)"),
                                            GRID_BACKWARD + "grad_y must have the shape of value", False),
    "grid_backward_graph_ptr_past_n": (grid_case(True, graph_ptr="L([0, 8])"),
                                       GRID_BACKWARD + r"graph_ptr\[-1\] must equal the number of nodes N = 4", False),
    "grid_backward_row_width_not_dividing": (grid_case(True, row_width="L([3])"),
                                             GRID_BACKWARD + r"row_width\[0\] must be positive and divide", False),
    "grid_backward_nodes_leave_their_image": (grid_case(True, nodes="L([0, 2, 1, 3])", checkpoints="ones(0, 1, 4)",
                                                        **TWO_IMAGES),
                                              GRID_BACKWARD + r"nodes\[1\] = 2 leaves graph 0", False),
    "grid_backward_weight_with_more_heads": (grid_case(True, weight="ones(4, 2, 2)"),
                                             GRID_BACKWARD + r"weight must have shape \[N, 2, H\]", False),
    "grid_backward_num_checkpoints_too_many": (grid_case(True, num_checkpoints=4, checkpoints="ones(4, 1, 4)"),
                                               GRID_BACKWARD + r"num_checkpoints must be .* = 2, got 4", False),
    "grid_backward_segment_rows_zero": (grid_case(True, segment_rows=0),
                                        GRID_BACKWARD + "segment_rows must be at least 1, got 0", False),
})

WORKER = r"""
import json, sys
import torch
import torch_geometric
import torch_geometric_chimera  # registers torch.ops.chimera
device = sys.argv[1]
ops = torch.ops.chimera
L = lambda values: torch.tensor(values, dtype=torch.long, device=device)
I = lambda values: torch.tensor(values, dtype=torch.int32, device=device)
ones = lambda *shape: torch.ones(*shape, device=device)
for name, code in json.loads(sys.stdin.read()):
    print(json.dumps(["start", name]), flush=True)
    try:
        with torch_geometric.debug():  # on CUDA: the checks that synchronize
            value = eval(code)
            if device == "cuda":
                torch.cuda.synchronize()
        result = ["returned", repr(value)]
    except Exception as error:  # noqa: BLE001 - the type is what the test checks
        result = [type(error).__name__, str(error).splitlines()[0] if str(error) else ""]
    print(json.dumps([name] + result), flush=True)
"""


def run_cases(names, device):
    """{name: (outcome, message)}; a crash is recorded for the case that was running."""
    return worker_cases.run_cases(WORKER, {n: CASES[n][0] for n in names}, device)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def outcomes(request):
    names = [n for n, case in CASES.items() if request.param == "cpu" or case[2]]
    return request.param, run_cases(names, request.param)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_index_argument_is_a_clean_error(name, outcomes):
    device, results = outcomes
    if name not in results:
        pytest.skip(f"{name}: the op runs on CPU only")
    outcome, message = results[name]
    assert outcome == "RuntimeError", f"{name} on {device}: {outcome}: {message}"
    assert re.search(CASES[name][1], message), message


def test_grid_cases_change_one_argument_of_a_valid_call():
    # Each grid case above is this call with one argument broken: the call itself must work.
    ops, ones = torch.ops.chimera, torch.ones
    L = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731 - the workers' helper
    y, checkpoints = eval(grid_case())
    assert y.shape == (4, 1, 2) and checkpoints.shape == (2, 1, 4)
    assert [g.shape for g in eval(grid_case(backward=True))] == [(4, 2, 1), (4, 1, 2), (4, 1, 2), (4, 1, 2)]
    for overrides in (TWO_IMAGES, dict(TWO_IMAGES, backward=True, checkpoints="ones(0, 1, 4)")):
        eval(grid_case(**overrides))
