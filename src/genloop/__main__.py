from genloop.cli.main import main

main()
