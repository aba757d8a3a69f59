"""`python -m inference.runtime.serve` and the `frugal-serve` console script: the OpenAI-compatible server.
It lives in inference.runtime.server (protocol, serving logic, app); its options: inference.runtime.server.app."""

from inference.runtime.server.app import main

if __name__ == "__main__":
    main()
