from embedsearch.cli.main import main

if __name__ == "__main__":  # not when multiprocessing imports it in a serve worker
    main()
