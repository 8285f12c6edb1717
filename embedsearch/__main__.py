from embedsearch.cli.main import main

main()
