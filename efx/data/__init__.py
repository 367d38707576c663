"""Domain data: the built-in medical and legal suites (from installed packages), user data, and
the prompt format shared by training and evaluation."""
from efx.data.suites import DataError, Suite, load_suite

__all__ = ["DataError", "Suite", "load_suite"]
