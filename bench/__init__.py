"""fhirbridge benchmarks: every figure a ratio of contenders measured side by side in one run (see README.md)."""
