from opt_queue.cli import main

main()
