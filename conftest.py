"""pytest's marks for test_soar.py (a test module cannot register them itself)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a real vLLM engine; runs where vllm is installed "
                                       "(CI: vLLM's CPU build in a virtual environment of its own, see .ci/run)")
