"""``python -m winclip_nb ...`` runs the ``winclip-nb`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
