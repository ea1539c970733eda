from vmexec.agent.main import main

main()
