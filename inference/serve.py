"""`python -m inference.serve` and the `frugal-serve` console script: the OpenAI-compatible server.
It lives in inference.server (protocol, serving logic, app); see inference.server.app for its options."""

from inference.server.app import main

if __name__ == "__main__":
    main()
