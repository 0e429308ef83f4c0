"""`python -m ghnq_deploy.cli`: the same as the `ghnq-deploy` command."""

from ghnq_deploy.cli import main

if __name__ == "__main__":
    main()
