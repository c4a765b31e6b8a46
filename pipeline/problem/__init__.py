"""Problems: the function and point a job builds, the job registry, and fingerprints."""
