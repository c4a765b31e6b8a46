"""The maths: derivatives of a function at a point, Ray-free and storage-free."""
