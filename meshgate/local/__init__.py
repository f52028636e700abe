"""The local stack: the whole mesh on one machine from a source checkout
(`make run`, `meshgate up`, the end-to-end tests and the benchmarks).

Redis and Triton launchers, how each child is started (children), the
process supervisor, the mesh's development CA, and the stack that wires
them. None of it is runtime code: no service imports it, and the wheel an
image installs leaves it out (tests/unit/test_deploy_wheel.py checks both).
It may assume a checkout (model_repository/ beside it); the services may
not.
"""
