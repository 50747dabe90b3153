/* execve(argv[1], argv + 1): a C program that runs an image like any binary. */
#include <stdio.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	execve(argv[1], argv + 1, environ);
	perror("execve");
	return 127;
}
