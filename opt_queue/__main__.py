from opt_queue.cli.commands import main

main()
