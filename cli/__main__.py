from segppo.cli.main import main

main()
