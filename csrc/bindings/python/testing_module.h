#pragma once
#include <pybind11/pybind11.h>
// Test-only functions: HMAC check against Python's hmac, and the FakeVerbs test double.
void bind_testing(pybind11::module_ m);
