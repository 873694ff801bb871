"""One cost model per method, same file name as the method's oracle."""
