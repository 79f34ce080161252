"""`relufy.step_profile`'s arithmetic: busy time is the union of kernel intervals, so kernels that overlap
(two streams, or CPU ops nested in one another) count once; the profiles themselves are run in test_speed.py."""

from relufy.step_profile import covered_us, kernel_diff


def test_busy_time_counts_overlapping_kernels_once():
    assert covered_us([]) == 0
    assert covered_us([(0, 10), (20, 25)]) == 15  # a gap of 10 is idle
    assert covered_us([(20, 25), (0, 10), (5, 15)]) == 20  # partial overlap, out of order
    assert covered_us([(0, 30), (5, 10), (12, 20)]) == 30  # nested


def test_kernel_diff_has_every_name_of_either_arm_largest_change_first():
    dense = {"kernels": [{"name": "gemv", "us_per_step": 100.0, "count_per_step": 3.0},
                         {"name": "add_rmsnorm", "us_per_step": 5.0, "count_per_step": 1.0}]}
    sparse = {"kernels": [{"name": "sparse_ffn", "us_per_step": 40.0, "count_per_step": 1.0},
                          {"name": "gemv", "us_per_step": 35.0, "count_per_step": 1.0},
                          {"name": "add_rmsnorm", "us_per_step": 9.0, "count_per_step": 2.0}]}
    rows = kernel_diff(dense, sparse)
    assert [row["name"] for row in rows] == ["gemv", "sparse_ffn", "add_rmsnorm"]
    assert rows[0]["delta_us_per_step"] == -65.0 and rows[0]["sparse_count_per_step"] == 1.0
    assert rows[1]["dense_us_per_step"] == 0.0 and rows[1]["dense_count_per_step"] == 0.0
    assert rows[2]["delta_us_per_step"] == 4.0 and rows[2]["dense_count_per_step"] == 1.0
