from cnnmnist.cli import main

main()
